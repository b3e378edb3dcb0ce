"""What the training step computes, read from its compiled program: a LoRA step forms no
weight gradient for the frozen base kernels (a third of a full step's matmul work), while a
full step does; and `peft.core.dense` keeps autodiff's numbers."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import models
from ftjax.peft import core as peft_core
from ftjax.peft.lora import apply_lora
from ftjax.train.step import sft_loss

# Distinct sizes so that a [hidden, intermediate] product can only be a kernel's gradient.
CFG = models.ModelConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_layers=2,
                         num_heads=4, num_kv_heads=2)
BATCH = {"inputs": jnp.zeros((2, 16), jnp.int32), "targets": jnp.ones((2, 16), jnp.int32),
         "loss_mask": jnp.ones((2, 16))}


def _kernel_grad_products(hlo: str) -> list[str]:
    """Matmuls (XLA dots or YNNPACK dot fusions) whose result has an MLP kernel's shape."""
    shape = re.compile(r"= f32\[(48,80|80,48)\]")
    return [ln for ln in hlo.splitlines() if shape.search(ln)
            and (" dot(" in ln or "kind=kCustom" in ln or "kind=kOutput" in ln)]


def test_lora_step_forms_no_frozen_weight_gradient():
    fn = sft_loss(CFG)
    params = models.init(CFG, jax.random.PRNGKey(0))
    full = jax.jit(jax.grad(lambda p: fn(p, BATCH, None)[0])).lower(params).compile().as_text()
    assert _kernel_grad_products(full)  # the check can see them when they are there
    lora = apply_lora(params, jax.random.PRNGKey(1), rank=4,
                      targets=(r"layers/mlp/(gate|up|down)_proj/kernel",))
    trainable, frozen = peft_core.partition(lora, peft_core.trainable_mask(lora, ()))
    step = jax.jit(jax.grad(lambda t: fn(peft_core.combine(t, frozen), BATCH, None)[0]))
    assert not _kernel_grad_products(step.lower(trainable).compile().as_text())


def test_dense_equals_autodiff():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 7)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((7, 4)), jnp.float32)
    f = lambda op: jax.grad(lambda x, w: jnp.sum(jnp.sin(op(x, w))), (0, 1))(x, w)
    ref = f(lambda x, w: jnp.einsum("...i,io->...o", x, w))
    for a, b in zip(f(peft_core.dense), ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
