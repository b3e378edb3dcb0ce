"""PEFT adapter directories (ftjax.io.peft_format): logit parity with peft + transformers.

Both ways on tiny random models (CPU torch, float32): ftjax LoRA/rsLoRA/DoRA with non-zero
random factors -> save_peft_adapter -> `peft.PeftModel.from_pretrained`, and adapters made
with `peft.get_peft_model` (random factors) -> `save_pretrained` -> load_peft_adapter. Also
merged export, the export script on a short LoRA run, and errors that list every problem.
Tolerance (as tests/test_hf_io.py): max |ftjax - peft| over real positions
<= 1e-4 * max |peft logit|.
"""
import dataclasses
import json
import pathlib
import zlib

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
from ftjax.peft.lora import DEFAULT_TARGETS, LoRAWeight, apply_lora  # noqa: E402
from tests.test_hf_io import (SIZE, V, _batch, _check_close, _ftjax_logits,  # noqa: E402
                              _hf_logits, _randomise_torch)

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASES = {
    # untied, GQA, MLP biases off
    "llama": (tf.LlamaConfig, dict(SIZE)),
    # q/k/v biases, tied embeddings
    "qwen2": (tf.Qwen2Config, dict(SIZE, tie_word_embeddings=True)),
    # Conv1D (fan_in_fan_out) and the fused q|k|v c_attn
    "gpt2": (tf.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=V)),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """name -> (HF directory, ModelConfig, ftjax base params), built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            config_cls, kwargs = BASES[name]
            torch.manual_seed(0)
            model = tf.AutoModelForCausalLM.from_config(config_cls(**kwargs,
                                                                   initializer_range=0.1))
            _randomise_torch(model)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cfg, params = hf.load_pretrained(path)
            cache[name] = (path, cfg, params)
        return cache[name]
    return get


def _hf_base(path):
    return tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _peft_logits(base_path, adapter_dir):
    model = peft.PeftModel.from_pretrained(_hf_base(base_path), str(adapter_dir)).eval()
    return _hf_logits(model, *_batch()), model


def _randomise_adapters(params, seed=0, scale=0.1):
    """Random non-zero a and b (and a perturbed DoRA magnitude) on every adapter leaf."""
    key = jax.random.PRNGKey(seed)

    def one(path, w):
        if not core.is_structured(w):
            return w
        k = jax.random.fold_in(key, zlib.crc32(path.encode()))
        ka, kb, km = jax.random.split(k, 3)
        new = dict(a=w.a + scale * jax.random.normal(ka, w.a.shape),
                   b=w.b + scale * jax.random.normal(kb, w.b.shape))
        if hasattr(w, "m"):
            new["m"] = w.m * (1 + 0.2 * jax.random.uniform(km, w.m.shape, minval=-1))
        return dataclasses.replace(w, **new)
    return core.map_weights(one, params)


def _logits(params, cfg):
    ids, mask, pos = _batch()
    return _ftjax_logits(params, cfg, ids, mask, pos)


def _moved(ours, base, mask):
    """The adapter changes the logits: otherwise a dropped adapter would pass parity."""
    real = mask.astype(bool)
    assert np.abs(ours - base)[real].max() > 100 * 1e-4 * np.abs(base[real]).max()


# --------------------------------------------------------------------------------------------
# ftjax -> PEFT

EXPORT_CASES = {
    "llama_qv": ("llama", dict(rank=4, alpha=8.0, targets=(r"layers/attn/(q|v)_proj/kernel",))),
    # every projection + embedding + head, rsLoRA, per-path ranks and alphas
    "llama_rslora_patterns": ("llama", dict(
        rank=4, alpha=8.0, rslora=True,
        targets=DEFAULT_TARGETS + ("embed/embedding", "lm_head/kernel"),
        rank_pattern={"v_proj": 2, "down_proj": 6}, alpha_pattern={"o_proj": 3.0,
                                                                   "up_proj": 5.0})),
    # a scale that alpha/r reproduces only with a carefully chosen float alpha
    "llama_odd_scale": ("llama", dict(rank=3, alpha=7.3, targets=(r"layers/mlp/up_proj/kernel",))),
    # tied embedding LoRA also adapts the LM head (ensure_weight_tying)
    "qwen2_tied_embedding": ("qwen2", dict(rank=4, alpha=4.0, targets=(
        r"layers/attn/(q|k|v|o)_proj/kernel", "embed/embedding"))),
    # q and v (not k) inside the fused c_attn with different ranks and scales
    "gpt2_fused": ("gpt2", dict(rank=4, alpha=8.0, targets=(
        r"layers/attn/(q|v|o)_proj/kernel", r"layers/mlp/down_proj/kernel",
        "pos_embed/embedding"),
        rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 2.0})),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_loads_in_peft_with_same_logits(base_dir, tmp_path, case):
    name, kw = EXPORT_CASES[case]
    path, cfg, base = base_dir(name)
    lora = _randomise_adapters(apply_lora(base, jax.random.PRNGKey(1), **kw))
    out = tmp_path / "adapter"
    assert pf.save_peft_adapter(out, cfg, lora, base_model_name_or_path=str(path)) == [
        "adapter_config.json", "adapter_model.safetensors"]
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM"
    assert conf["base_model_name_or_path"] == str(path) and conf["bias"] == "none"
    assert conf["fan_in_fan_out"] == (name == "gpt2") and not conf["use_dora"]
    tensors = load_file(out / "adapter_model.safetensors")
    assert all(v.dtype == np.float32 for v in tensors.values())
    if case == "llama_qv":
        assert conf["target_modules"] == ["q_proj", "v_proj"] and conf["r"] == 4
        assert conf["lora_alpha"] == 8 and not conf["use_rslora"]
        assert conf["rank_pattern"] == {} and conf["alpha_pattern"] == {}
        a = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
        b = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
        w = lora["layers"]["attn"]["v_proj"]["kernel"]
        np.testing.assert_array_equal(a, np.asarray(w.a[1]).T)  # [r, in]
        np.testing.assert_array_equal(b, np.asarray(w.b[1]).T)  # [out, r]
        assert a.shape == (4, 64) and b.shape == (32, 4)
    if case == "llama_rslora_patterns":
        assert conf["use_rslora"] and conf["r"] == 4 and conf["lora_alpha"] == 8
        assert conf["rank_pattern"] == {"mlp.down_proj": 6, "self_attn.v_proj": 2}
        assert conf["alpha_pattern"] == {"mlp.up_proj": 5, "self_attn.o_proj": 3}
        assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, V)
        assert tensors["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (64, 4)
    if case == "llama_odd_scale":
        assert conf["lora_alpha"] / conf["r"] == lora["layers"]["mlp"]["up_proj"]["kernel"].scale
    if case == "qwen2_tied_embedding":
        assert conf["ensure_weight_tying"]
    if case == "gpt2_fused":
        assert conf["target_modules"] == ["c_attn", "c_proj", "wpe"]
        a = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
        b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
        assert a.shape == (6, 64) and b.shape == (192, 6)  # ranks 4 (q) + 2 (v)
        assert not b[64:128].any()  # k has no adapter

    ids, mask, pos = _batch()
    ref, _ = _peft_logits(path, out)
    ours = _logits(lora, cfg)
    _moved(ours, _logits(base, cfg), mask)
    _check_close(ours, ref, mask, f"{case} ftjax->PEFT")

    back = pf.load_peft_adapter(out, cfg, base)  # and back
    np.testing.assert_allclose(_logits(back, cfg), ours, atol=1e-5 * np.abs(ours).max())
    if name != "gpt2":  # unfused: the very same factors and scales
        flat_a, flat_b = flatten(lora), flatten(back)
        for k, w in flat_a.items():
            if isinstance(w, LoRAWeight):
                assert flat_b[k].scale == w.scale, k
                np.testing.assert_array_equal(flat_b[k].a, np.asarray(w.a), err_msg=k)
                np.testing.assert_array_equal(flat_b[k].b, np.asarray(w.b), err_msg=k)
            else:
                assert not core.is_structured(flat_b[k]), k


# --------------------------------------------------------------------------------------------
# PEFT -> ftjax

IMPORT_CASES = {
    # per-module and per-layer ranks/alphas (layer 1's down_proj differs from layer 0's)
    "llama_patterns": ("llama", dict(
        r=4, lora_alpha=8, use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"],
        rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 6},
        alpha_pattern={"o_proj": 5, "layers.0.self_attn.q_proj": 3})),
    # a regex target string selecting some modules of some layers
    "llama_regex": ("llama", dict(r=2, lora_alpha=3, target_modules=(
        r".*\.layers\.1\.self_attn\.(q|k)_proj|.*\.mlp\.gate_proj"))),
    # layers_to_transform and exclude_modules
    "llama_layers": ("llama", dict(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj",
                                                                       "up_proj"],
                                   layers_to_transform=[1], exclude_modules=["up_proj"])),
    # embedding and head LoRA (PEFT also saves the full embedding/head weights)
    "llama_embed_head": ("llama", dict(r=4, lora_alpha=8, target_modules=[
        "embed_tokens", "lm_head", "v_proj"])),
    # fully trained modules next to the adapter (randomised copies)
    "llama_modules_to_save": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                            modules_to_save=["lm_head", "input_layernorm"])),
    "qwen2": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                               "o_proj"])),
    # tied embedding: PEFT ties the head's adapter to the embedding's and saves both
    "qwen2_tied_embedding": ("qwen2", dict(r=4, lora_alpha=8, ensure_weight_tying=True,
                                           target_modules=["embed_tokens", "q_proj"])),
    # fused c_attn: one A shared by q, k and v, B split by rows; Conv1D c_proj in attn and mlp
    "gpt2": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "wpe"],
                          fan_in_fan_out=True)),
    # bias="all": the (trained) biases of every module are saved and replace the base's
    "qwen2_bias_all": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     bias="all")),
}


def _peft_adapter(base_path, out, seed=0, **lora_kw):
    """A PEFT LoRA with random non-zero factors, saved to `out`; returns the PeftModel."""
    model = peft.get_peft_model(_hf_base(base_path), peft.LoraConfig(**lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n or (n.endswith(".bias") and p.requires_grad):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif "lora_" in n:
                if "magnitude" in n:
                    p.mul_(1 + 0.2 * (2 * torch.rand(p.shape, generator=g) - 1))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(out))
    return model.eval()


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_peft_adapter_loads_with_same_logits(base_dir, tmp_path, case):
    name, kw = IMPORT_CASES[case]
    path, cfg, base = base_dir(name)
    model = _peft_adapter(path, tmp_path / "adapter", **kw)
    ids, mask, pos = _batch()
    ref = _hf_logits(model, ids, mask, pos)
    before = np.array(base["layers"]["attn"]["k_proj"]["bias"]) if cfg.qkv_bias else None
    params = pf.load_peft_adapter(tmp_path / "adapter", cfg, base)
    ours = _logits(params, cfg)
    _moved(ours, _logits(base, cfg), mask)
    _check_close(ours, ref, mask, f"{case} PEFT->ftjax")
    if case == "llama_patterns":
        v = params["layers"]["attn"]["v_proj"]["kernel"]
        assert v.a.shape == (2, 64, 2) and v.scale == 8 / np.sqrt(2)
        down = params["layers"]["mlp"]["down_proj"]["kernel"]  # layer 0 zero-padded to 6
        assert down.a.shape == (2, 96, 6) and not np.asarray(down.a[0, :, 4:]).any()
    if case == "llama_modules_to_save":  # ... and back, as modules_to_save
        out = tmp_path / "again"
        pf.save_peft_adapter(out, cfg, params, modules_to_save=(
            "lm_head/kernel", "layers/attn_norm/scale"))
        conf = json.loads((out / "adapter_config.json").read_text())
        assert conf["modules_to_save"] == ["input_layernorm", "lm_head"]
        assert "base_model.model.model.layers.1.input_layernorm.weight" in load_file(
            out / "adapter_model.safetensors")
        _check_close(_peft_logits(path, out)[0], ref, mask, "modules_to_save ftjax->PEFT")
    if case == "qwen2_bias_all":  # the file's biases replace the base's; the input is intact
        k_bias = params["layers"]["attn"]["k_proj"]["bias"]
        assert np.abs(k_bias - base["layers"]["attn"]["k_proj"]["bias"]).max() > 1e-3
        np.testing.assert_array_equal(base["layers"]["attn"]["k_proj"]["bias"], before)
    if case == "llama_layers":
        q = params["layers"]["attn"]["q_proj"]["kernel"]
        assert not np.asarray(q.a[0]).any() and np.asarray(q.a[1]).any()
        assert not core.is_structured(params["layers"]["mlp"]["up_proj"]["kernel"])


def test_merged_export_equals_peft_merge(base_dir, tmp_path):
    """merge + hf.save_pretrained gives the model PeftModel.merge_and_unload gives."""
    path, cfg, base = base_dir("llama")
    _, kw = IMPORT_CASES["llama_patterns"]
    model = _peft_adapter(path, tmp_path / "adapter", **kw)
    ids, mask, pos = _batch()
    unmerged = _hf_logits(model, ids, mask, pos)
    merged_ref = _hf_logits(model.merge_and_unload().eval(), ids, mask, pos)
    params = pf.load_peft_adapter(tmp_path / "adapter", cfg, base)
    hf.save_pretrained(tmp_path / "merged", cfg, core.merge(params))
    ours = _hf_logits(_hf_base(tmp_path / "merged"), ids, mask, pos)
    _check_close(ours, merged_ref, mask, "merged ftjax export vs PEFT merge_and_unload")
    _check_close(ours, unmerged, mask, "merged ftjax export vs unmerged PEFT")


def test_pissa_adapter_exports_as_plain_lora(base_dir, tmp_path):
    """A LoRA trained on PiSSA's residual base becomes a rank-2r LoRA on the original base."""
    path, cfg, base = base_dir("llama")
    initial = apply_lora(base, jax.random.PRNGKey(1), rank=4, alpha=8.0, init="pissa",
                         targets=(r"layers/attn/(q|v)_proj/kernel",))
    trained = _randomise_adapters(initial, scale=0.05)
    pf.save_peft_adapter(tmp_path / "a", cfg, pf.residual_to_standard(trained, initial, base))
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 8
    ref, _ = _peft_logits(path, tmp_path / "a")
    _check_close(_logits(trained, cfg), ref, _batch()[1], "pissa ftjax->PEFT (rank 2r)")


# --------------------------------------------------------------------------------------------
# DoRA


def test_dora_both_ways(base_dir, tmp_path):
    import ftjax.peft.dora as dora
    path, cfg, base = base_dir("llama")
    ids, mask, pos = _batch()
    base_logits = _logits(base, cfg)
    # ftjax -> PEFT: DoRA on attention, plain LoRA on down_proj (written as DoRA with the
    # identity magnitude, since use_dora is global in PEFT).
    params = dora.apply_dora(base, jax.random.PRNGKey(1), rank=4, alpha=8.0,
                             targets=(r"layers/attn/(q|v)_proj/kernel",))
    params = apply_lora(params, jax.random.PRNGKey(2), rank=2, alpha=4.0,
                        targets=(r"layers/mlp/down_proj/kernel",))
    params = _randomise_adapters(params)
    pf.save_peft_adapter(tmp_path / "out", cfg, params)
    conf = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert conf["use_dora"] and conf["rank_pattern"] == {"mlp.down_proj": 2}
    t = load_file(tmp_path / "out" / "adapter_model.safetensors")
    m = t["base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"]
    np.testing.assert_array_equal(m, np.asarray(params["layers"]["attn"]["q_proj"]["kernel"].m[1]))
    ref, _ = _peft_logits(path, tmp_path / "out")
    ours = _logits(params, cfg)
    _moved(ours, base_logits, mask)
    _check_close(ours, ref, mask, "DoRA ftjax->PEFT")

    # PEFT -> ftjax
    model = _peft_adapter(path, tmp_path / "in", r=4, lora_alpha=8, use_dora=True,
                          target_modules=["q_proj", "v_proj", "down_proj"],
                          rank_pattern={"down_proj": 2})
    ref = _hf_logits(model, ids, mask, pos)
    loaded = pf.load_peft_adapter(tmp_path / "in", cfg, base)
    assert isinstance(loaded["layers"]["mlp"]["down_proj"]["kernel"], dora.DoRAWeight)
    ours = _logits(loaded, cfg)
    _moved(ours, base_logits, mask)
    _check_close(ours, ref, mask, "DoRA PEFT->ftjax")
    merged = _hf_logits(model.merge_and_unload().eval(), ids, mask, pos)
    _check_close(_logits(core.merge(loaded), cfg), merged, mask, "DoRA merged")


# --------------------------------------------------------------------------------------------
# IA3


def test_ia3_both_ways(base_dir, tmp_path):
    import ftjax.peft.ia3 as ia3
    path, cfg, base = base_dir("llama")
    ids, mask, pos = _batch()
    base_logits = _logits(base, cfg)
    # ftjax -> PEFT (PEFT's Llama defaults: k, v scale outputs, down_proj its input)
    params = ia3.apply_ia3(base)
    rng = np.random.RandomState(0)
    params = core.map_weights(lambda p, w: dataclasses.replace(
        w, ia3_l=w.ia3_l * (1 + 0.5 * rng.uniform(-1, 1, w.ia3_l.shape).astype(np.float32)))
        if core.is_structured(w) else w, params)
    pf.save_peft_adapter(tmp_path / "out", cfg, params)
    conf = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "IA3" and conf["feedforward_modules"] == ["down_proj"]
    assert conf["target_modules"] == ["down_proj", "k_proj", "v_proj"]
    t = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert t["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (32, 1)
    assert t["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 96)
    ref, _ = _peft_logits(path, tmp_path / "out")
    ours = _logits(params, cfg)
    _moved(ours, base_logits, mask)
    _check_close(ours, ref, mask, "IA3 ftjax->PEFT")

    # PEFT -> ftjax: q_proj scales its output, up_proj and down_proj their input
    model = peft.get_peft_model(_hf_base(path), peft.IA3Config(
        target_modules=["q_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj",
                                                                                "up_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.mul_(1 + 0.5 * (2 * torch.rand(p.shape, generator=g) - 1))
    model.save_pretrained(str(tmp_path / "in"))
    ref = _hf_logits(model.eval(), ids, mask, pos)
    loaded = pf.load_peft_adapter(tmp_path / "in", cfg, base)
    up = loaded["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(up, ia3.IA3Weight) and up.feedforward and up.ia3_l.shape == (2, 64)
    ours = _logits(loaded, cfg)
    _moved(ours, base_logits, mask)
    _check_close(ours, ref, mask, "IA3 PEFT->ftjax")

    # biased k/v (Qwen2): PEFT scales the bias too, ftjax does not -> refused both ways
    qpath, qcfg, qbase = base_dir("qwen2")
    with pytest.raises(pf.PeftFormatError, match="biased projection"):
        pf.save_peft_adapter(tmp_path / "q", qcfg, ia3.apply_ia3(qbase))


# --------------------------------------------------------------------------------------------
# Errors: one message listing every problem


def test_bad_adapter_lists_every_problem(base_dir, tmp_path):
    path, cfg, base = base_dir("llama")
    out = tmp_path / "adapter"
    _peft_adapter(path, out, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    f = out / "adapter_model.safetensors"
    t = load_file(f)
    p = "base_model.model.model.layers."
    dropped = f"{p}1.self_attn.v_proj.lora_B.weight"
    del t[dropped]
    extra = [f"{p}0.self_attn.k_proj.lora_A.weight",   # k_proj is not targeted
             f"{p}0.self_attn.q_proj.lora_C.weight",   # no such tensor
             f"{p}5.self_attn.q_proj.lora_A.weight"]   # no such layer
    for k in extra:
        t[k] = np.zeros((4, 64), np.float32)
    reshaped = f"{p}0.self_attn.q_proj.lora_B.weight"
    t[reshaped] = np.zeros((64, 3), np.float32)
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(pf.PeftFormatError) as e:
        pf.load_peft_adapter(out, cfg, base)
    msg = str(e.value)
    for k in [dropped, reshaped] + extra:
        assert k in msg, (k, msg)
    assert "missing tensors (1)" in msg and "unexpected tensors (3)" in msg
    assert "not selected by target_modules" in msg and "[64, 4]" in msg


def test_unsupported_adapters_are_refused(base_dir, tmp_path):
    path, cfg, base = base_dir("llama")
    out = tmp_path / "loha"
    model = peft.get_peft_model(_hf_base(path), peft.LoHaConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(str(out))
    with pytest.raises(pf.PeftFormatError, match="peft_type 'LOHA' is not supported"):
        pf.load_peft_adapter(out, cfg, base)

    out = tmp_path / "lora"
    _peft_adapter(path, out, r=2, lora_alpha=4, target_modules=["q_proj"])
    conf = json.loads((out / "adapter_config.json").read_text())
    conf.update(init_lora_weights="pissa_niter_4", lora_bias=True)
    (out / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(pf.PeftFormatError) as e:
        pf.load_peft_adapter(out, cfg, base)
    assert "path_initial_model_for_weight_conversion" in str(e.value)
    assert "lora_bias=true" in str(e.value)

    with pytest.raises(pf.PeftFormatError, match="no adapter leaves"):
        pf.save_peft_adapter(tmp_path / "none", cfg, base)

    # an embedding adapter on a tied model that leaves the tied head alone
    qpath, qcfg, qbase = base_dir("qwen2")
    _peft_adapter(qpath, tmp_path / "untied", r=2, lora_alpha=4, target_modules=["embed_tokens"])
    with pytest.raises(pf.PeftFormatError, match="ensure_weight_tying"):
        pf.load_peft_adapter(tmp_path / "untied", qcfg, qbase)


# --------------------------------------------------------------------------------------------
# scripts/export_peft.py on a short LoRA run started from a Hugging Face directory


def _export():
    import importlib.util
    spec = importlib.util.spec_from_file_location("export_peft",
                                                  ROOT / "scripts" / "export_peft.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_export_script_on_a_lora_run(base_dir, tmp_path):
    from ftjax import main as ftmain
    path, cfg, base = base_dir("llama")
    wd = tmp_path / "wd"
    ftmain.main(["--config", "configs/lora_sft.py:rank=4,alpha=8.0,rslora=True,steps=2",
                 "--workdir", str(wd), f"--config.model.init_from=hf:{path}",
                 "--config.data.n_per_task=40", "--config.data.eval_examples=0",
                 "--config.train.batch_size=8", "--config.train.progress=False",
                 "--config.train.tensorboard=False", "--config.optimizer.warmup_steps=1",
                 "--config.optimizer.learning_rate=0.01",
                 "--config.peft.train_patterns=lm_head/.*"])
    mod = _export()
    mod.main(["--workdir", str(wd), "--out", str(tmp_path / "adapter")])
    mod.main(["--workdir", str(wd), "--out", str(tmp_path / "merged"), "--format", "merged"])
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["use_rslora"] and conf["r"] == 4 and conf["lora_alpha"] == 8
    assert conf["base_model_name_or_path"] == str(path)
    assert conf["modules_to_save"] == ["lm_head"]  # trained in full next to the adapter

    _, trained, _, _, _, step, used = mod.restore_peft_run(str(wd))
    assert step == 2 and "layers/attn/q_proj/kernel/b" in used and "lm_head/kernel" in used
    assert np.abs(np.asarray(trained["lm_head"]["kernel"]) - base["lm_head"]["kernel"]).max() > 0
    q = trained["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(q, LoRAWeight) and np.abs(np.asarray(q.b)).max() > 0  # it trained
    ids, mask, pos = _batch()
    ours = _logits(trained, cfg)
    adapter_ref, _ = _peft_logits(path, tmp_path / "adapter")
    merged_ref = _hf_logits(_hf_base(tmp_path / "merged"), ids, mask, pos)
    _check_close(ours, adapter_ref, mask, "trained LoRA run -> PEFT adapter")
    _check_close(ours, merged_ref, mask, "trained LoRA run -> merged HF model")
