"""Every registered PEFT method trains on 8 fake devices exactly like on 1 (loss within 1e-5)."""
import jax
import ml_collections
import numpy as np
import pytest

from ftjax import models
from ftjax.peft import get_method, method_names
from ftjax.train import loop
from ftjax.train.run import Run
from ftjax.train.step import sft_loss
from tests.test_train import _loader, model_cfg_of, tiny_config

# Small method settings so the tiny model's shapes divide the mesh.
FIELDS = {"prompt_tuning": dict(num_virtual_tokens=4), "prefix_tuning": dict(num_virtual_tokens=4),
          "adapter": dict(bottleneck=8), "hft": dict(steps_per_round=2)}


def _run(method_name, tmp_path, devices, mesh):
    c = tiny_config(steps=3)
    c.mesh.update(mesh)
    c.peft = ml_collections.ConfigDict(dict(method=method_name, **FIELDS.get(method_name, {})))
    mcfg = model_cfg_of(c)
    m = get_method(c.peft, apply_fn=models.apply)
    res = loop.train(Run.of(c, str(tmp_path), model_cfg=mcfg,
                            init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)),
                            transform=m.transform, train_patterns=m.train_patterns,
                            wrap_optimizer=m.wrap_optimizer, devices=devices),
                     sft_loss(mcfg, 0.0, m.apply_fn, m.bind_rng), _loader(c))
    return [h["loss"] for h in res.history]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(method_names()) - {"full", "lora", "dora", "qlora", "ia3",
                                                         "adapter"}))
def test_method_sharded_equals_single_device(name, tmp_path):
    """(lora, dora, qlora, ia3 and adapters have the same check in their own test files.)"""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    one = _run(name, tmp_path / "one", jax.devices()[:1], {"data": 1})
    eight = _run(name, tmp_path / "eight", None, {"data": 2, "fsdp": 4})
    np.testing.assert_allclose(eight, one, rtol=1e-5)
