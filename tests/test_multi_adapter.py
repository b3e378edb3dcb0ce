"""Several LoRA adapters over one base: a batch mixing adapters equals each adapter alone (scan
and unrolled, cached generation), and combinations (cat, linear, SVD) with their errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models
from ftjax.infer.generate import generate
from ftjax.peft import core
from ftjax.peft.lora import LoRAWeight, apply_lora
from ftjax.peft import multi
from ftjax.peft.multi import (MultiLoRAWeight, combine_adapters, select_adapter,
                              stack_adapters)
from tests.test_train import model_cfg_of, tiny_config

apply = jax.jit(models.apply, static_argnums=1)
multi_apply = functools.partial(multi.multi_apply, base_apply=models.apply)
m_apply = jax.jit(multi_apply, static_argnums=1)


def _bump(tree, seed):
    """Non-zero B factors (they start at zero), base untouched."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))

    def one(_, w):
        if not isinstance(w, LoRAWeight):
            return w
        return w.replace(b=0.5 * jax.random.normal(next(keys), w.b.shape))
    return core.map_weights(one, tree)


@functools.lru_cache(maxsize=None)
def _adapters():
    """Three adapters over one base: different ranks, alphas and target sets."""
    mcfg = model_cfg_of(tiny_config())
    params = models.init(mcfg, jax.random.PRNGKey(0))
    qv = (r"layers/attn/(q|v)_proj/kernel",)
    ads = [_bump(apply_lora(params, jax.random.PRNGKey(1), rank=2, alpha=4.0), 10),
           _bump(apply_lora(params, jax.random.PRNGKey(2), rank=4, alpha=4.0, targets=qv), 11),
           _bump(apply_lora(params, jax.random.PRNGKey(3), rank=3, alpha=6.0,
                            targets=qv + (r"lm_head/kernel",)), 12)]
    return mcfg, params, ads


@pytest.mark.parametrize("scan", [True, False])
def test_mixed_batch_equals_each_adapter_alone(scan):
    mcfg, params, ads = _adapters()
    mcfg = mcfg.replace(scan_layers=scan)
    stacked = stack_adapters(ads)
    q = stacked["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(q, MultiLoRAWeight) and q.a.shape[:2] == (mcfg.num_layers, 3)
    assert q.scales == (2.0, 1.0, 2.0)
    assert isinstance(stacked["lm_head"]["kernel"], MultiLoRAWeight)
    ids = jnp.asarray([0, 1, 2, 1, -1])
    toks = jax.random.randint(jax.random.PRNGKey(4), (5, 7), 0, mcfg.vocab_size)
    got, _ = m_apply(stacked, mcfg, toks, adapter_ids=ids)
    for row, i in enumerate(ids.tolist()):
        want, _ = apply(params if i < 0 else ads[i], mcfg, toks[row:row + 1])
        np.testing.assert_allclose(got[row], want[0], atol=1e-5, err_msg=f"row {row}")
    # Unstacking gives the adapters back; an unbound stacked tree refuses to run.
    one = select_adapter(stacked, 1)
    np.testing.assert_allclose(apply(one, mcfg, toks)[0], apply(ads[1], mcfg, toks)[0],
                               atol=1e-5)
    with pytest.raises(ValueError, match="adapter ids"):
        models.apply(stacked, mcfg, toks)


def test_axes_and_cached_generation():
    mcfg, params, ads = _adapters()
    stacked = stack_adapters(ads)
    axes = core.axes_like(stacked, models.param_axes(mcfg))
    q = axes["layers"]["attn"]["q_proj"]["kernel"]
    assert q.a == ("layers", None, "embed", "lora_rank") and q.ids is None
    prompts = np.asarray([[0, 5, 6, 7], [8, 9, 10, 11], [0, 0, 12, 13]], np.int32)
    lengths = np.asarray([3, 4, 2])
    ids = [2, 0, 1]
    out = generate(stacked, mcfg, prompts, lengths, max_new_tokens=3, eos_id=-1,
                   apply_fn=functools.partial(multi_apply, adapter_ids=jnp.asarray(ids)))
    for row, i in enumerate(ids):
        want = generate(ads[i], mcfg, prompts[row:row + 1], lengths[row:row + 1],
                        max_new_tokens=3, eos_id=-1)
        np.testing.assert_array_equal(out[row], want[0])


def _delta(tree, path):
    w = core.map_weights(lambda p, x: x, tree)
    for k in path.split("/"):
        w = w[k]
    if not isinstance(w, LoRAWeight):
        return 0.0
    return w.scale * (w.a @ w.b)


def test_combinations_equal_the_weighted_sum_and_report_errors():
    _, _, ads = _adapters()
    weights = [0.5, -1.0, 2.0]
    path = "layers/attn/q_proj/kernel"
    want = sum(wt * _delta(a, path) for wt, a in zip(weights, ads))
    for how in ("cat", "linear"):
        comb, err = combine_adapters(ads, weights, how=how)
        w = comb["layers"]["attn"]["q_proj"]["kernel"]
        assert w.a.shape[-1] == 2 + 4 + 3 and err[path] < 1e-5
        np.testing.assert_allclose(w.a @ w.b, want, atol=1e-5)
    # Only adapter 0 adapts k_proj: the combination is 0.5 * its update.
    kp = "layers/attn/k_proj/kernel"
    comb, _ = combine_adapters(ads, weights, how="linear")
    k = comb["layers"]["attn"]["k_proj"]["kernel"]
    np.testing.assert_allclose(k.a @ k.b, 0.5 * _delta(ads[0], kp), atol=1e-5)
    # SVD truncation to rank 2: the reported error is the true relative Frobenius error.
    comb, err = combine_adapters(ads, weights, how="svd", rank=2)
    w = comb["layers"]["attn"]["q_proj"]["kernel"]
    assert w.a.shape[-1] == 2
    true = float(jnp.linalg.norm(w.a @ w.b - want) / jnp.linalg.norm(want))
    assert 0.01 < err[path] == pytest.approx(true, rel=1e-3)
    # Best rank-2 approximation (Eckart-Young): no worse than dropping any adapter's part.
    assert err[path] <= 1.0
