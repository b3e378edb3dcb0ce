"""Sparse upcycling: the upcycled MoE reproduces the dense model, carries every other param over,
fails clearly on configs it cannot upcycle, and trains through the sft trainer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models
from ftjax.models import upcycle as up

DENSE = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
             num_kv_heads=2, max_position_embeddings=64, init_std=0.1)
FAMILIES = {
    "llama": dict(),
    "qwen2": dict(),                               # q/k/v biases
    "qwen3": dict(),                               # q/k norms
    "gemma": dict(),                               # norm offset, GeGLU, tied, scaled embeddings
    "gpt2_no_bias": dict(mlp_bias=False),          # plain (non-gated) MLP without biases
}
# Routers whose k weights sum to one per token (function-preserving).
ROUTERS = [dict(router="topk_softmax"), dict(router="softmax_topk", router_renormalize=True)]


def dense_model(family="llama", seed=0, **kw):
    fam = "gpt2" if family.startswith("gpt2") else family
    cfg = models.preset(fam, **{**DENSE, **FAMILIES[family], **kw})
    params = models.init(cfg, jax.random.PRNGKey(seed))
    if cfg.qkv_bias:  # non-zero biases, so carrying them over is tested
        for name in ("q_proj", "k_proj", "v_proj"):
            b = params["layers"]["attn"][name]["bias"]
            params["layers"]["attn"][name]["bias"] = 0.1 * jax.random.normal(
                jax.random.PRNGKey(7), b.shape)
    return cfg, params


def tokens(cfg, b=2, t=16, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, cfg.vocab_size)


def logits(params, cfg, toks, **kw):
    return models.apply(params, cfg, toks, **kw)[0]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("router", range(len(ROUTERS)))
def test_upcycled_model_reproduces_dense_logits(family, dispatch, router):
    cfg, params = dense_model(family)
    toks = tokens(cfg)
    e, k = 4, 2
    # capacity_factor E/k gives every expert T slots per sequence: nothing can be dropped.
    new, mcfg = up.upcycle(params, cfg, num_experts=e, num_experts_per_tok=k,
                           key=jax.random.PRNGKey(3), router_init_std=1.0,
                           moe_dispatch=dispatch, capacity_factor=e / k, **ROUTERS[router])
    assert up.preserves_function(mcfg)
    want = logits(params, cfg, toks)
    got, aux = models.apply(new, mcfg, toks)
    assert float(jnp.max(jnp.abs(want))) > 0.5  # logits are not trivially small
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # The router really spreads tokens over experts (a strong random router): the equality
    # is not an artefact of every token choosing the same pair.
    load = np.asarray(aux["moe"]["load"])
    assert (load > 0).sum(axis=-1).min() >= 3
    assert float(np.max(aux["moe"]["dropped"])) == 0.0


def test_upcycle_with_padding_cache_and_unrolled_layers():
    cfg, params = dense_model("llama")
    new, mcfg = up.upcycle(params, cfg, num_experts=8, num_experts_per_tok=2,
                           key=jax.random.PRNGKey(0))
    toks = tokens(cfg, b=2, t=12)
    seg = jnp.ones_like(toks).at[1, 8:].set(0)
    want = logits(params, cfg, toks, segment_ids=seg)
    got = logits(new, mcfg.replace(scan_layers=False), toks, segment_ids=seg)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[1, :8], want[1, :8], atol=1e-5, rtol=0)
    # Incremental decoding with a KV cache matches too.
    cache = models.init_cache(mcfg, 2, 16)
    first, aux = models.apply(new, mcfg, toks[:, :10], cache=cache)
    step, _ = models.apply(new, mcfg, toks[:, 10:11], cache=aux["cache"])
    full = logits(params, cfg, toks[:, :11])
    np.testing.assert_allclose(step[:, 0], full[:, 10], atol=1e-5, rtol=0)


def test_conditions_of_the_invariant_matter():
    """Weights that do not sum to one, or dropped assignments, break the equality (the test
    above could fail)."""
    cfg, params = dense_model("llama")
    toks = tokens(cfg)
    want = logits(params, cfg, toks)
    key = jax.random.PRNGKey(3)
    unnorm, ucfg = up.upcycle(params, cfg, num_experts=4, key=key, router_init_std=1.0,
                              router="softmax_topk", router_renormalize=False)
    assert not up.preserves_function(ucfg)
    assert float(jnp.max(jnp.abs(logits(unnorm, ucfg, toks) - want))) > 1e-3
    tight, tcfg = up.upcycle(params, cfg, num_experts=4, key=key, router_init_std=1.0,
                             moe_dispatch="capacity", capacity_factor=0.25)
    got, aux = models.apply(tight, tcfg, toks)
    assert float(np.max(aux["moe"]["dropped"])) > 0
    assert float(jnp.max(jnp.abs(got - want))) > 1e-3


def test_params_carried_over_and_experts_are_copies():
    cfg, params = dense_model("qwen2")
    new, mcfg = up.upcycle(params, cfg, num_experts=4, num_experts_per_tok=2,
                           key=jax.random.PRNGKey(0), router_init_std=0.0)
    assert "mlp" not in new["layers"]
    flat_old = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    flat_new = dict(jax.tree_util.tree_flatten_with_path(new)[0])
    carried = [p for p in flat_old if "['mlp']" not in jax.tree_util.keystr(p)]
    assert len(carried) == len(flat_old) - 3
    for p in carried:
        assert flat_new[p] is flat_old[p]  # the same arrays, untouched
    for name in ("gate_proj", "up_proj", "down_proj"):
        dense_w = params["layers"]["mlp"][name]["kernel"]
        experts = new["layers"]["moe"][name]["kernel"]
        assert experts.shape == (cfg.num_layers, 4) + dense_w.shape[1:]
        for e in range(4):
            np.testing.assert_array_equal(experts[:, e], dense_w)
    assert not np.any(np.asarray(new["layers"]["moe"]["router"]["kernel"]))  # zero router
    # cfg' differs from cfg only in MoE fields (and the family name for the HF writer).
    changed = {k for k, v in mcfg.to_dict().items() if cfg.to_dict()[k] != v}
    assert changed == {"num_experts"}  # qwen2 keeps its name; k=2 is already the default
    assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, models.param_shapes(mcfg))
    _, lcfg = up.upcycle(*dense_model("llama")[::-1], num_experts=2, key=jax.random.PRNGKey(0))
    assert lcfg.family == "mixtral"


def test_router_init_std_sets_the_router_scale():
    cfg, params = dense_model("llama")
    new, _ = up.upcycle(params, cfg, num_experts=8, key=jax.random.PRNGKey(0),
                        router_init_std=0.05)
    r = np.asarray(new["layers"]["moe"]["router"]["kernel"])
    assert r.shape == (cfg.num_layers, cfg.hidden_size, 8)
    assert abs(r.std() - 0.05) < 0.005 and abs(r.mean()) < 0.005


def test_noise_breaks_symmetry_by_the_requested_relative_amount():
    cfg, params = dense_model("llama")
    noise = 0.01
    new, mcfg = up.upcycle(params, cfg, num_experts=4, key=jax.random.PRNGKey(0),
                           noise_std=noise)
    dense_w = np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"])
    experts = np.asarray(new["layers"]["moe"]["up_proj"]["kernel"])
    rel = (experts - dense_w[:, None]) / dense_w[:, None]
    assert abs(rel.std() - noise) < 0.1 * noise and abs(rel.mean()) < 0.1 * noise
    assert not np.allclose(experts[:, 0], experts[:, 1])  # experts differ from each other
    # Small noise: the function changes a little, not a lot.
    toks = tokens(cfg)
    diff = float(jnp.max(jnp.abs(logits(new, mcfg, toks) - logits(params, cfg, toks))))
    assert 1e-6 < diff < 0.05
    # Same key, same result (a resumed or exported run rebuilds the same model).
    again, _ = up.upcycle(params, cfg, num_experts=4, key=jax.random.PRNGKey(0),
                          noise_std=noise)
    np.testing.assert_array_equal(again["layers"]["moe"]["up_proj"]["kernel"], experts)


def test_numpy_params_stay_on_host_and_match_jax_path():
    cfg, params = dense_model("llama")
    host = jax.tree.map(np.asarray, params)
    key = jax.random.PRNGKey(5)
    a, _ = up.upcycle(host, cfg, num_experts=4, key=key, noise_std=0.01)
    b, _ = up.upcycle(params, cfg, num_experts=4, key=key, noise_std=0.01)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(a))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=0), a, b)
    # Under jit (the trainer's random-init path) too.
    c = jax.jit(lambda p: up.upcycle(p, cfg, num_experts=4, key=key, noise_std=0.01)[0])(params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=0), c, b)


def test_shared_experts_start_silent():
    cfg, params = dense_model("llama")
    new, mcfg = up.upcycle(params, cfg, num_experts=4, key=jax.random.PRNGKey(0),
                           num_shared_experts=2)
    shared = new["layers"]["moe"]["shared"]
    assert shared["up_proj"]["kernel"].shape == (cfg.num_layers, cfg.hidden_size,
                                                 2 * cfg.intermediate_size)
    toks = tokens(cfg)
    np.testing.assert_allclose(logits(new, mcfg, toks), logits(params, cfg, toks),
                               atol=1e-5, rtol=0)
    # ... and learn: the zero down projection gets a non-zero gradient.
    def loss(p):
        return jnp.mean(logits(p, mcfg, toks) ** 2)
    g = jax.grad(loss)(new)["layers"]["moe"]["shared"]["down_proj"]["kernel"]
    assert float(jnp.max(jnp.abs(g))) > 0


@pytest.mark.parametrize("make, kw, match", [
    (lambda: dense_model("llama", num_experts=4), {}, "already a mixture of experts"),
    (lambda: dense_model("gpt2_no_bias", mlp_bias=True), {}, "MLP biases"),
    (lambda: dense_model("llama"), {"hidden_size": 64}, "unknown MoE fields"),
    (lambda: dense_model("llama"), {"expert_intermediate_size": 16},
     "expert_intermediate_size=16 differs"),
    (lambda: dense_model("llama"), {"num_experts": 0}, "num_experts=0 must be >= 1"),
    (lambda: dense_model("llama"), {"num_experts_per_tok": 5}, "num_experts_per_tok=5"),
    (lambda: dense_model("llama"), {"noise_std": -1.0}, "noise_std"),
    (lambda: dense_model("llama"), {"moe_dispatch": "sparse"}, "moe_dispatch='sparse'"),
])
def test_clear_errors(make, kw, match):
    cfg, params = make()
    args = dict(num_experts=4, key=jax.random.PRNGKey(0))
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        up.upcycle(params, cfg, **args)


def test_errors_for_params_that_do_not_fit():
    cfg, params = dense_model("llama")
    other = cfg.replace(intermediate_size=64)
    with pytest.raises(ValueError, match="has shape .* the config expects"):
        up.upcycle(params, other, num_experts=4, key=jax.random.PRNGKey(0))
    from ftjax.peft.lora import apply_lora
    lora = apply_lora(params, jax.random.PRNGKey(1), rank=2, alpha=4.0)
    with pytest.raises(ValueError, match="LoRAWeight.*then apply PEFT"):
        up.upcycle(lora, cfg, num_experts=4, key=jax.random.PRNGKey(0))


def test_section_maps_to_the_config():
    sec = up.section(num_experts=8, top_k=1, dispatch="capacity", capacity_factor=2.0,
                     aux_loss_coef=0.02, router="softmax_topk", router_renormalize=True)
    cfg, _ = dense_model("llama")
    mcfg = up.config_from_section(sec, cfg)
    assert (mcfg.num_experts, mcfg.num_experts_per_tok, mcfg.moe_dispatch,
            mcfg.capacity_factor, mcfg.router_aux_loss_coef, mcfg.router,
            mcfg.router_renormalize) == (8, 1, "capacity", 2.0, 0.02, "softmax_topk", True)
    assert up.config_from_section(up.section(), cfg) is cfg  # num_experts=0: off
    assert up.config_from_section(None, cfg) is cfg
    with pytest.raises(ValueError, match="unknown fields.*experts"):
        up.section(experts=4)
    with pytest.raises(ValueError, match="unknown fields"):
        up.config_from_section({"num_experts": 2, "topk": 2}, cfg)


# --- The trainer: configs/upcycle_sft.py on the shipped quickstart base ----------------------

def _upcycle_run_config(arg="", **train):
    from configs import upcycle_sft
    c = upcycle_sft.get_config(arg)
    c.train.update(dict(progress=False, tensorboard=False, async_checkpoint=False, **train))
    return c


def _eval_loss(c, model_cfg, params, n=64):
    """Token-mean eval loss on the first n held-out examples, as the sft trainer computes it."""
    from ftjax import data as ftdata
    from ftjax.train import run as sft
    from ftjax.train.step import make_eval_step, sft_loss
    _, test = ftdata.make_splits(c.data.tasks[0], int(c.data.n_per_task), int(c.data.seed),
                                 float(c.data.test_frac))
    step = jax.jit(make_eval_step(sft_loss(model_cfg)))
    nll = tokens = 0.0
    for b in sft.fixed_batches(test[:n] if n else test, ftdata.CharTokenizer(), 32,
                              int(c.train.seq_len)):
        s = step(params, b)
        nll, tokens = nll + float(s["nll"]), tokens + float(s["tokens"])
    return nll / tokens


@pytest.mark.parametrize("arg", ["experts=4", "experts=4,dispatch=capacity"])
def test_upcycled_quickstart_base_starts_at_the_dense_eval_loss(arg):
    from ftjax.train import run as sft
    c = _upcycle_run_config(arg)
    dense_cfg, moe_cfg = sft.model_config(c.model, dense=True), sft.model_config(c.model)
    assert dense_cfg.num_experts == 0 and moe_cfg.num_experts == 4
    dense = sft.dense_initial_params(c, dense_cfg)()
    moe_params = sft.initial_params(c, moe_cfg)()
    assert "moe" in moe_params["layers"] and "mlp" in dense["layers"]
    want, got = _eval_loss(c, dense_cfg, dense), _eval_loss(c, moe_cfg, moe_params)
    assert want > 0.1  # an unseen task: the base has something to learn
    assert got == pytest.approx(want, rel=1e-5, abs=0)


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["experts=4", "experts=4,peft=lora,dispatch=capacity"])
def test_upcycled_base_fine_tunes_through_the_sft_trainer(arg, tmp_path):
    from ftjax.train import run as sft
    c = _upcycle_run_config(arg + ",steps=6", log_every=2, eval_every=6, batch_size=16)
    c.data.update(dict(n_per_task=200, eval_examples=0))
    c.optimizer.warmup_steps = 2
    dense_cfg = sft.model_config(c.model, dense=True)
    start = _eval_loss(c, dense_cfg, sft.dense_initial_params(c, dense_cfg)(), n=None)
    from ftjax.trainers import sft as sft_trainer
    summary = sft_trainer.run(c, str(tmp_path))
    (ev,) = summary["evals"]
    assert ev["step"] == 6 and len(ev["eval_moe_load"]) == c.model.num_layers
    assert ev["eval_loss"] < 0.8 * start, (start, ev["eval_loss"])
    np.testing.assert_allclose(np.sum(ev["eval_moe_load"], axis=-1), 1.0, atol=1e-5)
    assert summary["final_loss"] < start


def test_upcycled_llama_exports_as_hf_mixtral(tmp_path):
    """A Llama's upcycled config is family 'mixtral', so the Hugging Face writer saves it as
    MixtralForCausalLM, and transformers computes the same logits."""
    import torch
    import transformers
    from ftjax.io.hf import save_pretrained
    cfg, params = dense_model("llama")
    new, mcfg = up.upcycle(params, cfg, num_experts=4, key=jax.random.PRNGKey(1),
                           router_init_std=1.0, noise_std=0.05)
    save_pretrained(str(tmp_path), mcfg, jax.device_get(new))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert type(hf).__name__ == "MixtralForCausalLM"
    toks = np.asarray(tokens(cfg))
    with torch.no_grad():
        got = hf.eval()(torch.tensor(toks)).logits.numpy()
    np.testing.assert_allclose(got, logits(new, mcfg, toks), atol=1e-5, rtol=0)
