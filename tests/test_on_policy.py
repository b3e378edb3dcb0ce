"""The loop's on-policy seam: a producer that samples from the current, sharded params before
every step (as PPO / GRPO / RLOO rollouts do) sees exactly the params the step updates, learns
from its own samples, and resumes bit-exactly after a crash."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models
from ftjax.infer.generate import generate
from ftjax.train import loop
from ftjax.train.batches import OnPolicy
from ftjax.train.run import Run, model_config
from ftjax.train.step import sft_loss
from tests.test_train import tiny_config

PROMPT_LEN, NEW = 4, 6
LOW = 50  # tokens below this id are rewarded (about half of them at initialisation)


class Rollouts(OnPolicy):
    """Samples NEW tokens after fixed prompts with the current params; the reward of a sample is
    its share of tokens below LOW, centred over the batch (a REINFORCE advantage), and becomes the
    weight of each sampled token in the loss (policy gradient = weighted log-likelihood)."""

    def __init__(self, mcfg, batch: int, seed: int = 0, crash_at=None):
        self.mcfg, self.batch, self.seed, self.crash_at = mcfg, batch, seed, crash_at
        self.seen = []   # (step, first-layer checksum of the params it was handed)
        self.rewards = []

    def next_batch(self, step, params):
        if self.crash_at is not None and step == self.crash_at:
            raise KeyboardInterrupt("simulated preemption")
        self.seen.append((step, float(jnp.sum(params["embed"]["embedding"]))))
        rng = np.random.default_rng(1000 + step % 4)
        prompts = rng.integers(3, 60, (self.batch, PROMPT_LEN)).astype(np.int32)
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)  # from the step: resumable
        out = generate(params, self.mcfg, prompts, np.full((self.batch,), PROMPT_LEN, np.int32),
                       max_new_tokens=NEW, eos_id=-1, temperature=1.0, rng=key)
        reward = (out < LOW).mean(1)
        self.rewards.append(float(reward.mean()))
        adv = reward - reward.mean()
        seq = np.concatenate([prompts, out], 1)
        mask = np.zeros((self.batch, PROMPT_LEN + NEW - 1), np.float32)
        mask[:, PROMPT_LEN - 1:] = adv[:, None]
        t = seq.shape[1] - 1
        return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": mask,
                "segment_ids": np.ones((self.batch, t), np.int32),
                "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (self.batch, t)).copy()}

    def get_state(self):
        return {"rollouts": len(self.rewards)}


def _run(c, workdir, producer, devices=None):
    mcfg = model_config(c.model)
    run = Run.of(c, str(workdir), model_cfg=mcfg, devices=devices,
                 init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)))
    # The advantage-weighted log-likelihood: sft_loss sums mask * nll; normalise by the batch.
    base = sft_loss(mcfg)

    def loss_fn(params, batch, rng):
        obj, stats = base(params, batch, rng)
        n = jnp.float32(batch["inputs"].shape[0])
        return obj, dict(stats, tokens=n)
    return loop.train(run, loss_fn, producer), mcfg


def test_producer_sees_the_current_params_and_learns(tmp_path):
    c = tiny_config(steps=12, batch=16, seq=PROMPT_LEN + NEW - 1)
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 3e-2, 0
    c.mesh.update({"data": 2, "fsdp": 4})  # rollouts from params sharded over 8 devices
    mcfg = model_config(c.model)
    prod = Rollouts(mcfg, 16)
    res, _ = _run(c, tmp_path, prod)
    assert [s for s, _ in prod.seen] == list(range(12))
    init = float(jnp.sum(models.init(mcfg, jax.random.PRNGKey(0))["embed"]["embedding"]))
    assert prod.seen[0][1] == pytest.approx(init, rel=1e-6)
    sums = [v for _, v in prod.seen]
    assert all(a != b for a, b in zip(sums, sums[1:]))  # each step hands over the new params
    final = float(jnp.sum(res.params["embed"]["embedding"]))
    assert final != sums[-1]  # the last update comes after the last rollout
    # Policy gradient on its own samples raises the share of rewarded tokens.
    assert np.mean(prod.rewards[-3:]) > np.mean(prod.rewards[:3]) + 0.1, prod.rewards


def test_on_policy_resume_equals_uninterrupted(tmp_path):
    c = tiny_config(steps=6, batch=8, seq=PROMPT_LEN + NEW - 1, checkpoint_every=2)
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 3e-2, 0
    mcfg = model_config(c.model)
    full, _ = _run(c, tmp_path / "a", Rollouts(mcfg, 8))
    with pytest.raises(KeyboardInterrupt):
        _run(c, tmp_path / "b", Rollouts(mcfg, 8, crash_at=3))
    again = Rollouts(mcfg, 8)
    resumed, _ = _run(c, tmp_path / "b", again)
    assert resumed.resumed_from == 2 and [s for s, _ in again.seen] == [2, 3, 4, 5]
    ref = {h["step"]: h["loss"] for h in full.history}
    for h in resumed.history:
        assert h["loss"] == pytest.approx(ref[h["step"]], rel=1e-5, abs=1e-6), h["step"]
    for a, b in zip(jax.tree.leaves(jax.device_get(full.params)),
                    jax.tree.leaves(jax.device_get(resumed.params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
