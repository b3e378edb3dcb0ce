"""PEFT adapters on Mixtral experts (ftjax.io.peft_format): logit parity with peft 0.21.

Transformers 5 stores Mixtral's experts as raw 3-D parameters that PEFT adapts through
`target_parameters` (ParamWrapper). Both ways on a tiny random Mixtral (2 layers, 4 experts,
top-2; CPU torch, float32): ftjax LoRA on stacked expert kernels (random non-zero factors) ->
save_peft_adapter -> `peft.PeftModel.from_pretrained`, and back; adapters made with
`peft.get_peft_model` -> load_peft_adapter; transformers-4 per-expert (w1/w2/w3) adapters;
merged export; errors. Tolerance as tests/test_hf_io.py.
"""
import json

import jax
import numpy as np
import pytest

import torch
import transformers as tf
import peft
from safetensors.numpy import load_file, save_file  # noqa: E402

from ftjax.io import hf  # noqa: E402
from ftjax.io import peft_format as pf  # noqa: E402
from ftjax.io.params_file import flatten  # noqa: E402
from ftjax.peft import core  # noqa: E402
from ftjax.peft.lora import LoRAWeight, apply_lora  # noqa: E402
from tests.test_hf_io import _batch, _check_close, _hf_load, _hf_logits, _randomise_torch  # noqa
from tests.test_hf_mixtral import MIXTRAL, E, F  # noqa: E402
from tests.test_peft_format import _logits, _moved, _peft_adapter, _peft_logits  # noqa: E402

D = MIXTRAL["hidden_size"]
EXPERTS = r"layers/moe/(gate|up|down)_proj/kernel"
KEY = "base_model.model.model.layers.{}.mlp.{}"


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(HF directory, ModelConfig, ftjax base params) of a random Mixtral."""
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(**MIXTRAL))
    _randomise_torch(model)
    path = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(path)
    cfg, params = hf.load_pretrained(path)
    return path, cfg, params


@pytest.fixture(scope="module")
def base_logits(mixtral):
    _, cfg, params = mixtral
    return _logits(params, cfg)


def _randomise_adapters(params, seed=0, scale=0.1):
    """Random non-zero a and b on every adapter leaf (numpy: no compile per leaf shape)."""
    rng = np.random.RandomState(seed)

    def one(_, w):
        if not core.is_structured(w):
            return w
        return w.replace(a=np.asarray(w.a) + scale * rng.randn(*w.a.shape).astype(np.float32),
                         b=np.asarray(w.b) + scale * rng.randn(*w.b.shape).astype(np.float32))
    return core.map_weights(one, params)


def _assert_same_adapters(got, want, exact=True):
    """Every adapter leaf of `want` is in `got`: identical factors and scale (exact), or the
    same update s * a @ b (not exact); no other leaf is an adapter."""
    g, w = flatten(got), flatten(want)
    assert {k for k, v in g.items() if core.is_structured(v)} == \
        {k for k, v in w.items() if core.is_structured(v)}
    for k, v in w.items():
        if not core.is_structured(v):
            continue
        if exact:
            assert g[k].scale == v.scale, k
            np.testing.assert_array_equal(np.asarray(g[k].a), np.asarray(v.a), err_msg=k)
            np.testing.assert_array_equal(np.asarray(g[k].b), np.asarray(v.b), err_msg=k)
        else:
            np.testing.assert_allclose(np.asarray(core.materialize(g[k])),
                                       np.asarray(core.materialize(v)), atol=1e-6, err_msg=k)


# --------------------------------------------------------------------------------------------
# ftjax -> PEFT -> ftjax

EXPORT_CASES = {
    # gate, up, down of every expert: gate|up fused at rank 2r, down at r
    "experts": dict(rank=4, alpha=8.0, targets=(EXPERTS,)),
    # gate (not up) and down with their own ranks, the router, attention, rsLoRA
    "gate_down_router_attention": dict(
        rank=4, alpha=8.0, rslora=True,
        targets=(r"layers/moe/(gate|down)_proj/kernel", "layers/moe/router/kernel",
                 r"layers/attn/(q|v)_proj/kernel"),
        rank_pattern={"gate_proj": 2, "router": 3}),
    # up only: the only targeted parameter of the experts module (no base_layer in its keys)
    "up_only": dict(rank=3, alpha=7.3, targets=(r"layers/moe/up_proj/kernel",)),
    # attention only, as for the dense families
    "attention": dict(rank=4, alpha=8.0, targets=(r"layers/attn/(q|k|v|o)_proj/kernel",)),
    # gate and up with different scales: up's scale is folded into its half of B
    "gate_up_scales": dict(rank=2, alpha=4.0, targets=(r"layers/moe/(gate|up)_proj/kernel",),
                           alpha_pattern={"up_proj": 3.0}),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_loads_in_peft_and_back(mixtral, base_logits, tmp_path, case):
    path, cfg, base = mixtral
    lora = _randomise_adapters(apply_lora(base, jax.random.PRNGKey(1), **EXPORT_CASES[case]))
    out = tmp_path / "adapter"
    pf.save_peft_adapter(out, cfg, lora, base_model_name_or_path=str(path))
    conf = json.loads((out / "adapter_config.json").read_text())
    t = load_file(out / "adapter_model.safetensors")
    if case == "experts":
        assert conf["target_modules"] == [] and conf["lora_dropout"] == 0.0
        assert conf["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
        # gate_up is wrapped inside down_proj, so its keys carry one base_layer
        A = t[KEY.format(1, "experts.base_layer.lora_A.weight")]
        B = t[KEY.format(1, "experts.base_layer.lora_B.weight")]
        assert A.shape == (E * 8, D) and B.shape == (2 * F, 8 * E)
        assert t[KEY.format(1, "experts.lora_A.weight")].shape == (E * 4, F)
        assert t[KEY.format(1, "experts.lora_B.weight")].shape == (D, 4 * E)
        gate, up = (lora["layers"]["moe"][n]["kernel"] for n in ("gate_proj", "up_proj"))
        e = 2  # A rows e*R..: [A_gate; A_up]; B column j*E + e; B block-diagonal
        np.testing.assert_array_equal(A[e * 8:e * 8 + 4], np.asarray(gate.a[1, e]).T)
        np.testing.assert_array_equal(A[e * 8 + 4:e * 8 + 8], np.asarray(up.a[1, e]).T)
        Be = B[:, e::E]
        np.testing.assert_array_equal(Be[:F, :4], np.asarray(gate.b[1, e]).T)
        np.testing.assert_array_equal(Be[F:, 4:], np.asarray(up.b[1, e]).T)
        assert not Be[:F, 4:].any() and not Be[F:, :4].any()
    if case == "gate_down_router_attention":
        assert conf["target_modules"] == ["q_proj", "v_proj"] and conf["use_rslora"]
        assert conf["target_parameters"] == ["mlp.experts.down_proj",
                                             "mlp.experts.gate_up_proj", "mlp.gate.weight"]
        assert conf["rank_pattern"] == {"mlp.experts.gate_up_proj": 2, "mlp.gate.weight": 3}
        assert t[KEY.format(0, "gate.lora_A.weight")].shape == (3, D)
        assert t[KEY.format(0, "gate.lora_B.weight")].shape == (E, 3)
    if case == "up_only":
        assert conf["target_parameters"] == ["mlp.experts.gate_up_proj"]
        assert t[KEY.format(0, "experts.lora_B.weight")].shape == (2 * F, 3 * E)
    if case == "attention":
        assert "target_parameters" not in conf
    ours = _logits(lora, cfg)
    _moved(ours, base_logits, _batch()[1])
    ref, _ = _peft_logits(path, out)
    _check_close(ours, ref, _batch()[1], f"{case} ftjax->PEFT")

    # ... and back: the same factors (so the same logits), or for differing gate/up scales the
    # same weights
    back = pf.load_peft_adapter(out, cfg, base)
    _assert_same_adapters(back, lora, exact=case != "gate_up_scales")


def test_merged_export_of_expert_lora(mixtral, tmp_path):
    path, cfg, base = mixtral
    lora = _randomise_adapters(apply_lora(base, jax.random.PRNGKey(2), rank=4, alpha=8.0,
                                          targets=(EXPERTS, "layers/moe/router/kernel")))
    hf.save_pretrained(tmp_path, cfg, lora)
    model, info = _hf_load(tmp_path)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask, pos = _batch()
    _check_close(_logits(lora, cfg), _hf_logits(model, ids, mask, pos), mask, "merged export")


# --------------------------------------------------------------------------------------------
# PEFT -> ftjax

IMPORT_CASES = {
    # every expert parameter, the router and attention; random (not block structured) B, so
    # gate and up share the fused A
    "all": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                   "mlp.gate.weight"],
                rank_pattern={"mlp.experts.down_proj": 2}, alpha_pattern={"mlp.gate.weight": 3}),
    # down_proj alone (its keys have no base_layer), no target modules
    "down_only": dict(r=3, lora_alpha=6, target_modules=[],
                      target_parameters=["mlp.experts.down_proj"], use_rslora=True),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_peft_adapter_loads_with_same_logits(mixtral, base_logits, tmp_path, case):
    path, cfg, base = mixtral
    model = _peft_adapter(path, tmp_path / "adapter", **IMPORT_CASES[case])
    ids, mask, pos = _batch()
    ref = _hf_logits(model, ids, mask, pos)
    params = pf.load_peft_adapter(tmp_path / "adapter", cfg, base)
    ours = _logits(params, cfg)
    _moved(ours, base_logits, mask)
    _check_close(ours, ref, mask, f"{case} PEFT->ftjax")
    moe = params["layers"]["moe"]
    if case == "all":
        gate, up, down = (moe[n]["kernel"] for n in ("gate_proj", "up_proj", "down_proj"))
        assert gate.a.shape == (2, E, D, 4) and down.a.shape == (2, E, F, 2)
        np.testing.assert_array_equal(gate.a, up.a)
        assert moe["router"]["kernel"].scale == 3 / 4
    if case == "down_only":
        assert not core.is_structured(moe["gate_proj"]["kernel"])
        assert moe["down_proj"]["kernel"].scale == 6 / np.sqrt(3)


def test_transformers4_per_expert_adapter(mixtral, base_logits, tmp_path):
    """Adapters of the transformers-4 era sit on per-expert Linear modules; check against the
    transformers model with s * B @ A merged into each expert's slice of the fused weights."""
    path, cfg, base = mixtral
    r, alpha = 2, 4
    rng = np.random.RandomState(0)
    shapes = {"w1": (F, D), "w3": (F, D), "w2": (D, F)}
    tensors = {}
    for i in range(2):
        h = f"base_model.model.model.layers.{i}."
        for e in range(E):
            for w, (n_out, n_in) in shapes.items():
                key = f"{h}block_sparse_moe.experts.{e}.{w}"
                tensors[key + ".lora_A.weight"] = 0.1 * rng.randn(r, n_in).astype(np.float32)
                tensors[key + ".lora_B.weight"] = 0.1 * rng.randn(n_out, r).astype(np.float32)
        tensors[h + "self_attn.q_proj.lora_A.weight"] = 0.1 * rng.randn(r, D).astype(np.float32)
        tensors[h + "self_attn.q_proj.lora_B.weight"] = 0.1 * rng.randn(D, r).astype(np.float32)
    out = tmp_path / "legacy"
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=r, lora_alpha=alpha, target_modules=["q_proj", "w1", "w2", "w3"])))
    params = pf.load_peft_adapter(out, cfg, base)
    assert params["layers"]["moe"]["up_proj"]["kernel"].a.shape == (2, E, D, r)

    model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    s = alpha / r

    def delta(key):
        return torch.tensor(s * tensors[key + ".lora_B.weight"] @ tensors[key + ".lora_A.weight"])
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            h = f"base_model.model.model.layers.{i}."
            layer.self_attn.q_proj.weight += delta(h + "self_attn.q_proj")
            for e in range(E):
                x = f"{h}block_sparse_moe.experts.{e}."
                layer.mlp.experts.gate_up_proj[e, :F] += delta(x + "w1")
                layer.mlp.experts.gate_up_proj[e, F:] += delta(x + "w3")
                layer.mlp.experts.down_proj[e] += delta(x + "w2")
    ids, mask, pos = _batch()
    ours = _logits(params, cfg)
    _moved(ours, base_logits, mask)
    _check_close(ours, _hf_logits(model, ids, mask, pos), mask, "transformers-4 adapter")


# --------------------------------------------------------------------------------------------
# Errors


def test_expert_adapter_errors(mixtral, tmp_path):
    path, cfg, base = mixtral
    from ftjax.peft.dora import apply_dora
    dora = apply_dora(base, jax.random.PRNGKey(0), rank=2, alpha=4.0,
                      targets=(r"layers/moe/down_proj/kernel",))
    with pytest.raises(pf.PeftFormatError) as e:
        pf.save_peft_adapter(tmp_path / "dora", cfg, dora)
    assert "layers/moe/down_proj/kernel" in str(e.value) and "plain LoRA only" in str(e.value)

    out = tmp_path / "bad"
    lora = _randomise_adapters(apply_lora(base, jax.random.PRNGKey(1), rank=2, alpha=4.0,
                                          targets=(EXPERTS,)))
    pf.save_peft_adapter(out, cfg, lora)
    conf = json.loads((out / "adapter_config.json").read_text())
    conf["target_parameters"].append("mlp.experts.w13_weight")
    conf["use_dora"] = True
    (out / "adapter_config.json").write_text(json.dumps(conf))
    t = load_file(out / "adapter_model.safetensors")
    del t[KEY.format(1, "experts.lora_B.weight")]
    t[KEY.format(0, "experts.base_layer.lora_A.weight")] = np.zeros((E * 4 + 1, D), np.float32)
    save_file(t, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(pf.PeftFormatError) as e:
        pf.load_peft_adapter(out, cfg, base)
    msg = str(e.value)
    for needle in ("'mlp.experts.w13_weight' selects no parameter",
                   "use_dora=true with target_parameters",
                   KEY.format(1, "experts.lora_B.weight"),
                   f"has shape [{E * 4 + 1}, {D}], expected [{E * 4}, {D}] (r=4 from the "
                   f"config, {E} experts)"):
        assert needle in msg, (needle, msg)


# --------------------------------------------------------------------------------------------
# scripts/export_peft.py on a short LoRA run over the experts of a Hugging Face Mixtral


@pytest.mark.slow
def test_export_script_on_an_expert_lora_run(mixtral, tmp_path):
    from ftjax import main as ftmain
    from tests.test_peft_format import _export, _hf_base
    path, cfg, base = mixtral
    wd = tmp_path / "wd"
    ftmain.main(["--config", "configs/lora_sft.py:rank=4,alpha=8.0,steps=2",
                 "--workdir", str(wd), f"--config.model.init_from=hf:{path}",
                 "--config.peft.targets=('layers/attn/(q|v)_proj/kernel',"
                 "'layers/moe/(gate|up|down)_proj/kernel')",
                 "--config.data.n_per_task=40", "--config.data.eval_examples=0",
                 "--config.train.batch_size=8", "--config.train.progress=False",
                 "--config.train.tensorboard=False", "--config.optimizer.warmup_steps=1",
                 "--config.optimizer.learning_rate=0.01"])
    mod = _export()
    mod.main(["--workdir", str(wd), "--out", str(tmp_path / "adapter")])
    mod.main(["--workdir", str(wd), "--out", str(tmp_path / "merged"), "--format", "merged"])
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert conf["target_modules"] == ["q_proj", "v_proj"]
    _, trained, _, _, _, step, used = mod.restore_peft_run(str(wd))
    assert step == 2 and "layers/moe/up_proj/kernel/b" in used
    up = trained["layers"]["moe"]["up_proj"]["kernel"]
    assert isinstance(up, LoRAWeight) and np.abs(np.asarray(up.b)).max() > 0  # it trained
    ids, mask, pos = _batch()
    ours = _logits(trained, cfg)
    _check_close(ours, _peft_logits(path, tmp_path / "adapter")[0], mask,
                 "expert LoRA run -> PEFT adapter")
    _check_close(ours, _hf_logits(_hf_base(tmp_path / "merged"), ids, mask, pos), mask,
                 "expert LoRA run -> merged HF model")


def test_target_parameters_on_a_dense_family(tmp_path):
    from ftjax import models
    from ftjax.models.config import preset
    cfg = preset("llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                 num_heads=2, num_kv_heads=2)
    base = models.init(cfg, jax.random.PRNGKey(0))
    save_file({"base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight":
               np.zeros((2, 32), np.float32)}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=2, lora_alpha=4, target_modules=[],
        target_parameters=["mlp.gate_proj.weight"])))
    with pytest.raises(pf.PeftFormatError) as e:
        pf.load_peft_adapter(tmp_path, cfg, base)
    assert "'mlp.gate_proj.weight' selects no parameter ftjax can adapt in LlamaForCausalLM" \
        in str(e.value) and "mixture-of-experts weights only" in str(e.value)


def test_qlora_expert_adapter_loads_in_peft_over_the_dequantized_base(mixtral, tmp_path):
    """QLoRA on the experts: the adapter factors export as for LoRA, and PEFT over a
    transformers Mixtral holding the dequantized NF4 experts reproduces ftjax's logits."""
    from ftjax.peft.qlora import apply_qlora
    path, cfg, base = mixtral
    q = _randomise_adapters(apply_qlora(base, jax.random.PRNGKey(2), rank=4, alpha=8.0,
                                        targets=(EXPERTS,)))
    kernel = q["layers"]["moe"]["down_proj"]["kernel"]
    assert core.is_structured(kernel.base)  # LoRA over a quantized base, not over a dense one
    deq_dir = tmp_path / "dequantized"
    dequantized = core.map_weights(
        lambda _, w: core.materialize(w.base) if isinstance(w, LoRAWeight) else w, q)
    hf.save_pretrained(deq_dir, cfg, jax.device_get(dequantized))
    out = tmp_path / "adapter"
    pf.save_peft_adapter(out, cfg, q, base_model_name_or_path=str(deq_dir))
    ours = _logits(q, cfg)
    ref, _ = _peft_logits(deq_dir, out)
    _check_close(ours, ref, _batch()[1], "QLoRA experts ftjax->PEFT")
