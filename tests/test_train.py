"""The training step and loop: accumulation, sharding, resume, optimizers, early stopping."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from ftjax import data as ftdata
from ftjax import models
from ftjax.train import loop, optim
from ftjax.train.run import Run
from ftjax.train.state import create_state
from ftjax.train.step import make_train_step, sft_loss, split_microbatches

TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, max_position_embeddings=64)


def tiny_config(steps=8, batch=8, seq=32, **train_kw):
    c = common.base("sft")
    c.model = common.model("llama", **TINY)
    c.optimizer = common.optimizer("adamw", learning_rate=3e-3, warmup_steps=2,
                                   schedule="cosine")
    c.train = common.train(steps=steps, batch_size=batch, seq_len=seq, log_every=1,
                           progress=False, tensorboard=False, async_checkpoint=False,
                           **train_kw)
    return c


def model_cfg_of(c):
    from ftjax.train.run import model_config
    return model_config(c.model)


def random_batch(seed, b=8, t=32, vocab=99):
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, vocab, (b, t + 1)).astype(np.int32)
    lengths = rng.integers(t // 3, t + 1, b)  # ragged label counts per row
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": mask,
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}


def run_steps(c, batches, accum=1, devices=None, rules="fsdp", mesh=None):
    """Runs the jitted, sharded step over `batches`; returns (losses, final params)."""
    c = ml_collections.ConfigDict(c.to_dict())
    c.sharding.rules = rules
    if mesh:
        c.mesh.update(mesh)
    mcfg = model_cfg_of(c)
    placement = loop.Placement(c, mcfg, devices=devices)
    tx, sched = optim.make_optimizer(c.optimizer, c.train.steps)
    params = jax.device_put(models.init(mcfg, jax.random.PRNGKey(0)), placement.params)
    abstract = jax.eval_shape(lambda p: create_state(p, tx, 0), params)
    from ftjax import sharding
    state_sh = sharding.state_shardings(abstract, params, placement.params, placement.mesh)
    state = jax.jit(lambda p: create_state(p, tx, 0), out_shardings=state_sh)(params)
    from ftjax.train.step import jit_train_step
    step = jit_train_step(make_train_step(sft_loss(mcfg), tx, accum_steps=accum,
                                          schedule=sched), state_sh, placement.batch)
    losses = []
    for b in batches:
        state, m = step(state, placement.put_batch(b))
        losses.append(float(m["loss"]))
    return np.array(losses), jax.device_get(state.params)


def test_split_microbatches_interleaves_rows():
    x = {"a": jnp.arange(8)[:, None] * jnp.ones((1, 3))}
    out = split_microbatches(x, 4)["a"]
    assert out.shape == (4, 2, 3)
    np.testing.assert_array_equal(out[:, :, 0], [[0, 4], [1, 5], [2, 6], [3, 7]])


def test_accumulation_equals_large_batch():
    c = tiny_config(steps=3)
    batches = [random_batch(i) for i in range(3)]
    one = jax.devices()[:1]
    l1, p1 = run_steps(c, batches, accum=1, devices=one, mesh={"data": 1})
    l4, p4 = run_steps(c, batches, accum=4, devices=one, mesh={"data": 1})
    # Loss is normalised by the label tokens of the whole window, so ragged masks still agree.
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("rules,mesh", [("dp", {"data": 8}), ("fsdp", {"data": 1, "fsdp": 8}),
                                        ("fsdp_tp", {"data": 2, "fsdp": 2, "tensor": 2})])
def test_sharded_equals_unsharded(rules, mesh):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    c = tiny_config(steps=4)
    batches = [random_batch(10 + i) for i in range(4)]
    ref, pref = run_steps(c, batches, devices=jax.devices()[:1], mesh={"data": 1})
    out, pout = run_steps(c, batches, rules=rules, mesh=mesh)
    # Tolerance: float32 reductions are reordered across devices; 1e-5 relative on the loss.
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(pref), jax.tree.leaves(pout)):
        np.testing.assert_allclose(a, b, atol=1e-5)


class _CrashAfter:
    """Wraps a loader and raises after `n` batches, like a preempted job."""

    def __init__(self, it, n):
        self.it, self.n = it, n

    def __next__(self):
        if self.n == 0:
            raise KeyboardInterrupt("simulated preemption")
        self.n -= 1
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, s):
        self.it.set_state(s)


def _loader(c):
    tok = ftdata.CharTokenizer()
    ex = ftdata.mixture(["add", "reverse"], 200, seed=0)
    return ftdata.SyntheticLoader(ex, tok, c.train.batch_size, c.train.seq_len, seed=1)


def _train(c, workdir, it):
    mcfg = model_cfg_of(c)
    return loop.train(Run.of(c, str(workdir), model_cfg=mcfg,
                             init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0))),
                      sft_loss(mcfg), it)


def test_resume_equals_uninterrupted(tmp_path):
    c = tiny_config(steps=10, checkpoint_every=4)
    full = _train(c, tmp_path / "a", _loader(c))
    with pytest.raises(KeyboardInterrupt):
        _train(c, tmp_path / "b", _CrashAfter(_loader(c), 6))
    resumed = _train(c, tmp_path / "b", _loader(c))
    assert resumed.resumed_from == 4
    ref = {h["step"]: h["loss"] for h in full.history}
    got = {h["step"]: h["loss"] for h in resumed.history}
    assert sorted(got) == list(range(5, 11))
    for s in got:
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-7), s
    for a, b in zip(jax.tree.leaves(jax.device_get(full.state)),
                    jax.tree.leaves(jax.device_get(resumed.state))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # metrics.jsonl has every logged step (steps 5-6 twice: before and after the crash).
    rows = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    assert {r["step"] for r in rows if r["split"] == "train"} == set(range(1, 11))


def test_retention_keeps_latest_checkpoints(tmp_path):
    c = tiny_config(steps=8, checkpoint_every=2, keep_checkpoints=2)
    _train(c, tmp_path, _loader(c))
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps == [6, 8]


def test_loss_falls_and_early_stopping(tmp_path):
    c = tiny_config(steps=60, eval_every=5, early_stopping_patience=2,
                    early_stopping_min_delta=10.0)  # no eval can improve by 10 nats
    c.optimizer.learning_rate = 1e-2
    mcfg = model_cfg_of(c)
    tok = ftdata.CharTokenizer()
    tr, te = ftdata.make_splits("reverse", 300, seed=0)
    from ftjax.train.run import fixed_batches as eval_batches
    res = loop.train(Run.of(c, str(tmp_path), model_cfg=mcfg,
                            init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0))),
                     sft_loss(mcfg), ftdata.SyntheticLoader(tr, tok, 8, 32, seed=0), eval_batches=eval_batches(te, tok, 8, 32))
    assert res.stopped_early and res.state.step == 15  # first eval sets best; 2 more fail
    assert res.evals[-1]["eval_loss"] < res.evals[0]["eval_loss"]
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.5


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_reduces_loss(name):
    c = tiny_config(steps=12)
    c.optimizer.name = name
    c.optimizer.learning_rate = {"sgd": 0.5, "adagrad": 0.05, "adafactor": 0.01}.get(name, 3e-3)
    b = random_batch(0)
    losses, _ = run_steps(c, [b] * 12, devices=jax.devices()[:1], mesh={"data": 1})
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("kind", optim.SCHEDULES)
def test_schedules_with_warmup(kind):
    cfg = common.optimizer(learning_rate=1.0, schedule=kind, warmup_steps=10, min_lr_ratio=0.1)
    s = optim.make_schedule(cfg, 110)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    end = float(s(110))
    assert end == pytest.approx({"constant": 1.0, "linear": 0.1, "cosine": 0.1}[kind], abs=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        optim.make_schedule(common.optimizer(schedule="step"), 10)


def test_z_loss_and_clipping():
    c = tiny_config(steps=1)
    mcfg = model_cfg_of(c)
    params = models.init(mcfg, jax.random.PRNGKey(0))
    b = jax.tree.map(jnp.asarray, random_batch(0))
    base, s = sft_loss(mcfg, 0.0)(params, b, None)
    with_z, _ = sft_loss(mcfg, 1e-2)(params, b, None)
    assert float(with_z - base) == pytest.approx(1e-2 * float(s["z"]), rel=1e-5)
    tx, _ = optim.make_optimizer(common.optimizer("sgd", learning_rate=1.0, momentum=0.0,
                                                  grad_clip_norm=1e-3, schedule="constant"), 1)
    g = jax.tree.map(jnp.ones_like, params)
    upd, _ = tx.update(g, tx.init(params), params)
    import optax
    assert float(optax.tree.norm(upd)) == pytest.approx(1e-3, rel=1e-4)


def test_nan_loss_fails_loudly(tmp_path):
    c = tiny_config(steps=3)
    c.optimizer.learning_rate = 1e30
    c.optimizer.grad_clip_norm = 0.0
    c.optimizer.warmup_steps = 0
    with pytest.raises(FloatingPointError, match="non-finite"):
        _train(c, tmp_path, _loader(c))


def test_logged_mfu_counts_a_lora_step_by_the_frozen_base_convention(tmp_path):
    from ftjax.peft.lora import apply_lora
    c = tiny_config(steps=3)
    c.monitor = ml_collections.ConfigDict(dict(peak_flops=1e12))
    mcfg = model_cfg_of(c)
    transform = lambda p, key: apply_lora(p, key, rank=4, alpha=8.0,
                                          targets=(r"layers/attn/(q|v)_proj/kernel",))
    res = loop.train(Run.of(c, str(tmp_path), model_cfg=mcfg, transform=transform,
                            train_patterns=(),
                            init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0))),
                     sft_loss(mcfg), _loader(c))
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    row = [r for r in rows if r.get("split") == "train" and r.get("mfu")][-1]
    fpt = row["mfu"] * 1e12 * jax.device_count() / row["tokens_per_s"]  # mfu is per device
    n = loop.adapter_params_per_token(mcfg, res.state.params)
    assert n == 2 * 4 * ((32 + 32) + (32 + 16))  # 2 layers x r (in + out) of q [32, 32], v [32, 16]
    want = loop.flops_per_token(mcfg, c.train.seq_len, adapter_params=n)
    assert fpt == pytest.approx(want, rel=1e-3)
    assert want < 0.9 * loop.flops_per_token(mcfg, c.train.seq_len)  # not PaLM's 6N count
