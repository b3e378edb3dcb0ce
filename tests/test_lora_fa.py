"""LoRA-FA, the worked example of docs/writing_a_transform.md: registered by its own file,
identity at init, A frozen (no gradient, no optimizer state), training lowers the loss, the
DPO reference strips it, and it exposes LoRA's factors for PEFT export."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftjax import models, peft
from ftjax.align import reference
from ftjax.peft import core
from ftjax.peft.lora_fa import LoRAFAWeight
from ftjax.train.step import sft_loss
from tests.test_train import model_cfg_of, random_batch, tiny_config

apply = jax.jit(models.apply, static_argnums=1)


def _setup(**settings):
    c = tiny_config()
    c.peft = peft.method_defaults("lora_fa")
    c.peft.update(dict(rank=4, alpha=8.0, **settings))
    mcfg = model_cfg_of(c)
    params = models.init(mcfg, jax.random.PRNGKey(0))
    m = peft.get_method(c.peft)
    return c, mcfg, params, m, m.transform(params, jax.random.PRNGKey(1))


def test_registered_in_one_place_with_its_defaults():
    assert "lora_fa" in peft.method_names()
    d = peft.method_defaults("lora_fa")
    assert d.method == "lora_fa" and d.rank == 8 and "dropout" not in d
    assert peft.resolve({"method": "lora_fa", "rank": 2}).alpha == d.alpha
    with pytest.raises(ValueError, match=r"peft.rnak.*did you mean rank"):
        peft.resolve({"method": "lora_fa", "rnak": 2})


def test_identity_at_init_and_frozen_a():
    _, mcfg, params, m, fa = _setup()
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, mcfg.vocab_size)
    np.testing.assert_allclose(apply(fa, mcfg, toks)[0], apply(params, mcfg, toks)[0],
                               atol=1e-6)
    w = fa["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(w, LoRAFAWeight) and float(jnp.abs(w.a).max()) > 0
    mask = core.trainable_mask(fa, m.train_patterns)["layers"]["attn"]["q_proj"]["kernel"]
    assert mask.b is True and mask.a is False and mask.base is False
    # The same A as LoRA's for the same key (rebuilt from seed and shapes, never saved).
    lora = peft.get_method({"method": "lora", "rank": 4, "alpha": 8.0}).transform(
        params, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(w.a, lora["layers"]["attn"]["q_proj"]["kernel"].a)
    # Merge equals the unmerged model; the export protocol sees LoRA's factors.
    np.testing.assert_allclose(apply(core.merge(fa), mcfg, toks)[0], apply(fa, mcfg, toks)[0],
                               atol=1e-5)
    a, b, s = w.lora_factors()
    assert a is w.a and b is w.b and s == pytest.approx(2.0)
    core.axes_like(fa, models.param_axes(mcfg))  # every field has logical axes


def test_training_moves_only_b_and_lowers_the_loss():
    c, mcfg, _, m, fa = _setup()
    trainable, frozen = core.partition(fa, core.trainable_mask(fa, m.train_patterns))
    q = trainable["layers"]["attn"]["q_proj"]["kernel"]
    assert q.a is None and q.b is not None  # A is not a trainable leaf at all
    tx = optax.adam(1e-2)
    opt_state = tx.init(trainable)
    # Optimizer state only for B: adam's mu and nu hold one leaf per trainable leaf.
    n_b = len(jax.tree.leaves(trainable))
    assert len(jax.tree.leaves(opt_state)) == 2 * n_b + 1  # + adam's step count
    loss_fn = sft_loss(mcfg, 0.0)
    batch = {k: jnp.asarray(v) for k, v in random_batch(0, b=4, t=16,
                                                         vocab=mcfg.vocab_size).items()}

    @jax.jit
    def step(trainable, opt_state):
        def loss(t):
            total, stats = loss_fn(core.combine(t, frozen), batch, None)
            return total / stats["tokens"]
        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    losses = []
    for _ in range(30):
        trainable, opt_state, value = step(trainable, opt_state)
        losses.append(float(value))
    assert losses[-1] < losses[0] - 0.1, losses
    final = core.combine(trainable, frozen)["layers"]["attn"]["q_proj"]["kernel"]
    start = fa["layers"]["attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(final.a, start.a)           # A never moved
    assert float(jnp.abs(final.b - start.b).max()) > 0          # B did


def test_dpo_reference_strips_it():
    c, mcfg, params, m, fa = _setup()
    abstract = jax.eval_shape(m.transform, models.param_shapes(mcfg), jax.random.PRNGKey(1))
    assert reference.strip_safe(abstract, m.train_patterns, c.peft) == (True, "")
    assert reference.resolve_mode("auto", abstract, m.train_patterns, c.peft) == "strip"
    for got, want in zip(jax.tree.leaves(reference.strip_adapters(fa)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="choose default or gaussian"):
        _setup(init="pissa")
    with pytest.raises(ValueError, match="match no weight"):
        _setup(targets=("nothing/.*",))
