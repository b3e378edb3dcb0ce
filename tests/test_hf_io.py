"""Hugging Face checkpoint IO (ftjax.io.hf): logit parity with transformers (CPU torch, float32).

Every family is checked both ways on a tiny random model with randomised norm weights and
biases (so a wrong norm offset or a dropped bias shows up), on a batch with left and right
padding (compared only at real positions). Tolerance: max |ftjax - transformers| over real
positions <= 1e-4 * max |transformers logit|.
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers as tf
from safetensors.numpy import load_file, save_file  # noqa: E402
from safetensors.torch import load_file as torch_load_file  # noqa: E402
from safetensors.torch import save_file as torch_save_file  # noqa: E402

from ftjax import models  # noqa: E402
from ftjax.io import hf  # noqa: E402
from ftjax.io.params_file import flatten, load_params, unflatten  # noqa: E402
from ftjax.models.config import preset  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-4
V, T = 128, 16
SIZE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, vocab_size=V)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}


def _batch():
    """ids, attention mask (row 1 left-padded, row 2 right-padded) and positions."""
    ids = np.random.RandomState(0).randint(0, V, (3, T))
    mask = np.ones((3, T), np.int64)
    mask[1, :5] = 0
    mask[2, 11:] = 0
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    return ids, mask, pos


def _hf_logits(model, ids, mask, pos):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.float().numpy()


def _ftjax_logits(params, cfg, ids, mask, pos):
    out, _ = models.apply(params, cfg, jnp.asarray(ids), positions=jnp.asarray(pos),
                          segment_ids=jnp.asarray(mask, jnp.int32))
    return np.asarray(out)


def _check_close(ours, ref, mask, what):
    real = mask.astype(bool)
    err = float(np.abs(ours - ref)[real].max())
    scale = float(np.abs(ref[real]).max())
    print(f"{what}: max|diff| = {err:.2e} = {err / scale:.1e} x max|logit| ({scale:.2f})")
    assert scale > 0.1, "logits too small to make the comparison meaningful"
    assert err <= RTOL * scale, f"{what}: max diff {err} > {RTOL} * {scale}"


def _hf_load(path, **kw):
    model, info = tf.AutoModelForCausalLM.from_pretrained(
        str(path), output_loading_info=True, dtype=torch.float32, **kw)
    return model.eval(), info


def _randomise_torch(model, seed=0):
    """Norm weights and biases away from their 1 / 0 init, so they change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms (weight, bias) and linear biases
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def _rewrite_config(path, fn):
    c = json.loads((path / "config.json").read_text())
    fn(c)
    (path / "config.json").write_text(json.dumps(c))


def _to_v4_rope(c):
    """Only the transformers v4 keys: top-level rope_theta plus rope_scaling (old 'type' key)."""
    rp = c.pop("rope_parameters")
    c["rope_theta"] = rp.pop("rope_theta")
    rope_type = rp.pop("rope_type")
    c["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rp}


def _strip_gpt2_prefix(path, n_layers, n_pos):
    """The Hub's GPT-2 layout: no `transformer.` prefix, plus the causal-mask buffers."""
    f = path / "model.safetensors"
    tensors = {k.removeprefix("transformer."): v for k, v in torch_load_file(f).items()}
    for i in range(n_layers):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch_save_file(tensors, f, metadata={"format": "pt"})


# name: (config class, config kwargs, save kwargs, post-save rewrite)
HF_CASES = {
    # GQA, untied, attention and MLP biases, llama3 RoPE scaling, v5 rope_parameters only.
    "llama": (tf.LlamaConfig, dict(SIZE, attention_bias=True, mlp_bias=True,
                                   rope_parameters=dict(LLAMA3, rope_theta=5e5)), {}, None),
    # MQA, tied, sliding window (4) shorter than the sequence, linear scaling as a v4 config.
    "mistral": (tf.MistralConfig, dict(SIZE, num_key_value_heads=1, sliding_window=4,
                                       tie_word_embeddings=True,
                                       rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                        "rope_theta": 1e4}),
                {}, lambda p: _rewrite_config(p, _to_v4_rope)),
    # q/k/v biases, tied, a configured window that use_sliding_window=false turns off; sharded.
    "qwen2": (tf.Qwen2Config, dict(SIZE, tie_word_embeddings=True, use_sliding_window=False,
                                   sliding_window=4, rope_parameters={"rope_type": "default",
                                                                      "rope_theta": 1e6}),
              dict(max_shard_size="60KB"), None),
    # q/k norms, explicit head_dim != hidden/heads, untied, bf16 storage.
    "qwen3": (tf.Qwen3Config, dict(SIZE, head_dim=32), dict(dtype=torch.bfloat16), None),
    # (1 + w) norms, sqrt(D) embedding scale, gelu_tanh, explicit head_dim, tied.
    "gemma": (tf.GemmaConfig, dict(SIZE, head_dim=32), {}, None),
    # Conv1D, fused c_attn, learned positions, LayerNorm with bias; keys as transformers writes.
    "gpt2": (tf.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=V,
                                 bos_token_id=0, eos_token_id=0), {}, None),
    # GPT-2 as on the Hub: no `transformer.` prefix, attn.bias / attn.masked_bias buffers.
    "gpt2_hub": (tf.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     vocab_size=V, bos_token_id=0, eos_token_id=0), {},
                 lambda p: _strip_gpt2_prefix(p, 2, 64)),
}


@pytest.mark.parametrize("name", list(HF_CASES))
def test_load_transformers_checkpoint_matches_logits(tmp_path, name):
    config_cls, kwargs, save_kw, rewrite = HF_CASES[name]
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config_cls(**kwargs, initializer_range=0.1))
    _randomise_torch(model)
    dtype = save_kw.pop("dtype", None) if save_kw else None
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(tmp_path, **save_kw)
    if rewrite is not None:
        rewrite(tmp_path)
    files = sorted(os.listdir(tmp_path))
    if name == "qwen2":
        assert "model.safetensors.index.json" in files and len(
            [f for f in files if f.endswith(".safetensors")]) > 2
    # The reference is what transformers itself reads from this directory, in float32.
    ref_model, _ = _hf_load(tmp_path)
    ids, mask, pos = _batch()
    ref = _hf_logits(ref_model, ids, mask, pos)

    cfg, params = hf.load_pretrained(tmp_path)
    family = name.split("_")[0]
    assert cfg.family == family and cfg.param_dtype == "float32"
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    if name == "mistral":
        assert cfg.sliding_window == 4 and cfg.num_kv_heads == 1
        assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_theta) == ("linear", 2.0, 1e4)
    if name == "llama":
        assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_position,
                cfg.rope_theta) == ("llama3", 8.0, 8, 5e5)
        assert cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias and not cfg.tie_embeddings
    if name == "qwen2":
        assert cfg.sliding_window is None and cfg.qkv_bias and cfg.tie_embeddings
    if name == "qwen3":
        assert cfg.qk_norm and cfg.dim_per_head == 32
    if name == "gemma":
        assert cfg.norm_offset == 1.0 and cfg.embed_scale and cfg.activation == "gelu_tanh"
    _check_close(_ftjax_logits(params, cfg, ids, mask, pos), ref, mask, f"{name} HF->ftjax")

    if name == "qwen3":  # bf16 storage can also be kept in bf16
        cfg16, p16 = hf.load_pretrained(tmp_path, dtype="bfloat16")
        assert cfg16.param_dtype == "bfloat16"
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
        np.testing.assert_array_equal(np.asarray(p16["layers"]["attn"]["q_proj"]["kernel"],
                                                 np.float32),
                                      params["layers"]["attn"]["q_proj"]["kernel"])


def _randomise_params(params, seed=0):
    """Norm scales and biases away from their init, so they change the logits."""
    flat = flatten(params)
    rng = np.random.RandomState(seed)
    for k, v in flat.items():
        if "norm" in k or k.endswith("/bias"):
            flat[k] = np.asarray(v) + 0.5 * rng.randn(*v.shape).astype(np.float32)
    return unflatten(flat)


SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
             num_kv_heads=2, max_position_embeddings=64, init_std=0.1)
# name: (ModelConfig, save_pretrained kwargs)
FTJAX_CASES = {
    "llama": (preset("llama", **SMALL, qkv_bias=True, o_bias=True, mlp_bias=True,
                     rope_theta=5e5, rope_scaling="llama3", rope_factor=8.0,
                     rope_original_max_position=8), {}),
    "mistral": (preset("mistral", **dict(SMALL, num_kv_heads=1), sliding_window=4,
                       tie_embeddings=True), {}),
    "qwen2": (preset("qwen2", **SMALL, tie_embeddings=True, sliding_window=4),
              dict(shard_size_mb=0.05)),
    "qwen3": (preset("qwen3", **SMALL, head_dim=32, rope_scaling="linear", rope_factor=2.0),
              dict(dtype="bfloat16")),
    "gemma": (preset("gemma", **dict(SMALL, num_kv_heads=1), head_dim=32), {}),
    "gpt2": (preset("gpt2", **dict(SMALL, num_kv_heads=4), tie_embeddings=False), {}),
}


@pytest.mark.parametrize("name", list(FTJAX_CASES))
def test_save_loads_in_transformers_with_no_missing_keys(tmp_path, name):
    cfg, save_kw = FTJAX_CASES[name]
    params = _randomise_params(models.init(cfg, jax.random.PRNGKey(1)))
    written = hf.save_pretrained(tmp_path, cfg, params, **save_kw)
    c = json.loads((tmp_path / "config.json").read_text())
    if cfg.position == "rope":  # both RoPE forms, consistent
        assert c["rope_parameters"]["rope_theta"] == c["rope_theta"] == cfg.rope_theta
        assert (c["rope_scaling"] or {}).get("rope_type") == cfg.rope_scaling
    if cfg.tie_embeddings:
        assert "lm_head.weight" not in json.dumps(
            {f: list(load_file(tmp_path / f)) for f in written if f.endswith(".safetensors")})
    if "shard_size_mb" in save_kw:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2

    model, info = _hf_load(tmp_path)
    assert {k: list(v) for k, v in info.items()} == {k: [] for k in info}, info
    if save_kw.get("dtype") == "bfloat16":  # compare against what was stored
        params = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32),
                              params)
    ids, mask, pos = _batch()
    _check_close(_ftjax_logits(params, cfg, ids, mask, pos), _hf_logits(model, ids, mask, pos),
                 mask, f"{name} ftjax->HF")

    cfg2, params2 = hf.load_pretrained(tmp_path)  # and back, exactly
    assert cfg2 == cfg.replace(param_dtype="float32")
    for k, v in flatten(params).items():
        np.testing.assert_array_equal(flatten(params2)[k], np.asarray(v), err_msg=k)


def _zeros(cfg):
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), models.param_shapes(cfg))


def test_resave_replaces_stale_shards(tmp_path):
    cfg, _ = FTJAX_CASES["qwen2"]
    params = _zeros(cfg)
    hf.save_pretrained(tmp_path, cfg, params, shard_size_mb=0.05)
    hf.save_pretrained(tmp_path, cfg, params)
    assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == ["model.safetensors"]


# --------------------------------------------------------------------------------------------
# Bad input: one error that lists every problem.


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    cfg, _ = FTJAX_CASES["llama"]
    hf.save_pretrained(path, cfg, models.init(cfg, jax.random.PRNGKey(0)))
    return path


def _copy_dir(src, dst):
    dst.mkdir(exist_ok=True)
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def test_bad_tensors_listed_in_one_error(llama_dir, tmp_path):
    path = _copy_dir(llama_dir, tmp_path / "bad")
    t = load_file(path / "model.safetensors")
    dropped = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.k_proj.bias",
               "lm_head.weight"]
    for k in dropped:
        del t[k]
    extra = ["model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.7.mlp.gate_proj.weight"]
    for k in extra:
        t[k] = np.zeros((4,), np.float32)
    reshaped = ["model.layers.1.self_attn.q_proj.weight", "model.norm.weight"]
    for k in reshaped:
        t[k] = np.zeros((3, 5), np.float32)
    save_file(t, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf.HFCheckpointError) as e:
        hf.load_pretrained(path)
    msg = str(e.value)
    for k in dropped + extra + reshaped:
        assert k in msg, (k, msg)
    assert "missing tensors (3)" in msg and "unexpected tensors (2)" in msg
    assert "[64, 64]" in msg  # the expected q_proj shape
    assert "LlamaForCausalLM (llama)" in msg and "GPT2LMHeadModel (gpt2)" in msg


def test_missing_shard_and_pickles_are_reported(llama_dir, tmp_path):
    path = _copy_dir(llama_dir, tmp_path / "noweights")
    os.remove(path / "model.safetensors")
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(hf.HFCheckpointError, match="no pickles"):
        hf.load_pretrained(path)
    shard = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}))
    with pytest.raises(hf.HFCheckpointError, match=shard):
        hf.load_pretrained(path)


def test_unsupported_config_lists_every_problem(llama_dir, tmp_path):
    path = _copy_dir(llama_dir, tmp_path / "cfg")

    def bad(c):
        c["architectures"], c["model_type"] = ["Qwen2ForCausalLM"], "qwen2"
        c.pop("rope_scaling")
        c["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                "partial_rotary_factor": 0.5}
        c.update(use_sliding_window=True, sliding_window=8, max_window_layers=1)
        c.pop("layer_types", None)
        c["hidden_act"] = "gelu_fast"
    _rewrite_config(path, bad)
    with pytest.raises(hf.HFCheckpointError) as e:
        hf.load_pretrained(path)
    msg = str(e.value)
    for needle in ("'yarn'", "partial_rotary_factor=0.5", "max_window_layers=1", "gelu_fast",
                   "unexpected tensors", "model.layers.0.self_attn.o_proj.bias"):
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("arch,model_type,needle", [
    # A dense checkpoint whose config.json claims Mixtral: the dense MLP tensors are named.
    ("MixtralForCausalLM", "mixtral", "holds dense MLP weights"),
    ("FalconForCausalLM", "falcon", "unsupported architecture"),
    ("LlamaForSequenceClassification", "llama", "not a causal LM"),
])
def test_unsupported_architectures(llama_dir, tmp_path, arch, model_type, needle):
    path = _copy_dir(llama_dir, tmp_path / "arch")
    _rewrite_config(path, lambda c: c.update(architectures=[arch], model_type=model_type))
    with pytest.raises(hf.HFCheckpointError) as e:
        hf.load_pretrained(path)
    assert needle in str(e.value) and "Qwen3ForCausalLM (qwen3)" in str(e.value)


def test_save_rejects_what_the_family_cannot_express(tmp_path):
    cfg = preset("llama", **SMALL, qk_norm=True, sliding_window=8, qkv_bias=True)
    with pytest.raises(hf.HFCheckpointError) as e:
        hf.save_pretrained(tmp_path, cfg, _zeros(cfg))
    msg = str(e.value)
    assert "qk_norm=True" in msg and "sliding_window=8" in msg and "o_bias=False" in msg
    cfg = preset("llama", **SMALL)
    params = _zeros(cfg)
    del params["lm_head"]
    params["layers"]["mlp"]["up_proj"]["kernel"] = params["layers"]["mlp"]["up_proj"]["kernel"][:1]
    with pytest.raises(hf.HFCheckpointError) as e:
        hf.save_pretrained(tmp_path, cfg, params)
    assert "lm_head/kernel" in str(e.value) and "layers/mlp/up_proj/kernel" in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing written


# --------------------------------------------------------------------------------------------
# Conversion script and training from a Hugging Face directory.


def _convert(*argv):
    import importlib.util
    spec = importlib.util.spec_from_file_location("convert_hf", ROOT / "scripts" / "convert_hf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(list(argv))


def test_convert_script_round_trip(llama_dir, tmp_path):
    out = tmp_path / "model.safetensors"
    _convert("--to", "ftjax", "--hf", str(llama_dir), "--out", str(out))
    cfg, params = load_params(str(out))
    assert cfg == hf.load_config(str(llama_dir))
    _convert("--to", "hf", "--ckpt", str(out), "--out", str(tmp_path / "hf"), "--dtype", "bfloat16")
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert c["dtype"] == "bfloat16" and c["rope_scaling"]["rope_type"] == "llama3"
    cfg2, params2 = hf.load_pretrained(tmp_path / "hf")
    k = params["layers"]["attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(params2["layers"]["attn"]["q_proj"]["kernel"],
                                  np.asarray(jnp.asarray(k, jnp.bfloat16), np.float32))


def test_train_from_hf_then_export_workdir(tmp_path):
    """`--config.model.init_from=hf:DIR` takes the architecture from DIR; the trained orbax
    checkpoint converts back to a directory transformers loads with the same logits."""
    from ftjax import main as ftmain
    src = tmp_path / "src"
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**SIZE, initializer_range=0.1))
    model.save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    wd = tmp_path / "wd"
    ftmain.main(["--config", "configs/sft_synthetic.py:tasks=reverse,steps=2", "--workdir",
                 str(wd), f"--config.model.init_from=hf:{src}", "--config.data.n_per_task=40",
                 "--config.data.eval_examples=0", "--config.train.batch_size=8",
                 "--config.train.progress=False", "--config.train.tensorboard=False",
                 "--config.optimizer.warmup_steps=1", "--config.optimizer.learning_rate=0.01",
                 f"--config.export.hf_dir={tmp_path / 'direct'}"])
    out = tmp_path / "exported"
    _convert("--to", "hf", "--ckpt", str(wd), "--out", str(out))
    assert (out / "tokenizer_config.json").exists()  # copied from the init_from directory
    exported, info = _hf_load(out)
    assert not any(info.values()), info
    cfg, params = hf.load_pretrained(out)
    assert cfg == hf.load_config(str(src))
    moved = np.abs(params["layers"]["mlp"]["up_proj"]["kernel"]
                   - model.model.layers[0].mlp.up_proj.weight.detach().numpy().T[None]).max()
    assert moved > 1e-4  # the trained params were exported, not the initial ones
    ids, mask, pos = _batch()
    _check_close(_ftjax_logits(params, cfg, ids, mask, pos), _hf_logits(exported, ids, mask, pos),
                 mask, "trained llama ftjax->HF")
    # The run's own export (export.hf_dir) holds the same trained weights.
    _, direct = hf.load_pretrained(tmp_path / "direct")
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# Peak host memory while loading (streaming into preallocated stacked arrays).

_MEASURE = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from ftjax.io import hf

    def status(field):  # kB; VmHWM is the peak RSS of this process image (not its parent's)
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    base = status("VmRSS")
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    cfg, params = hf.load_pretrained(sys.argv[1], dtype=sys.argv[2])
    peak = status("VmHWM")
    size = sum(x.nbytes for x in jax.tree.leaves(params))
    print(json.dumps({"params_mib": size / 2**20, "peak_growth_mib": (peak - base) / 2**10}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_load_peak_memory_is_about_one_copy(tmp_path):
    """A 160 MiB model: peak RSS growth while loading stays near one copy (+ one tensor)."""
    cfg = preset("llama", vocab_size=16000, hidden_size=512, intermediate_size=1408,
                 num_layers=8, num_heads=8, num_kv_heads=8)
    hf.save_pretrained(tmp_path, cfg, models.init(cfg, jax.random.PRNGKey(0)))
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    for dtype in ("float32", "bfloat16"):
        r = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path), dtype], env=env,
                           capture_output=True, text=True, timeout=300, check=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"load {dtype}: {m}")
        # One copy of the params plus transient buffers for one tensor (the largest, the
        # 31 MiB fp32 embedding: its read buffer and, when casting, a converted copy).
        assert m["peak_growth_mib"] < m["params_mib"] + 2 * 31.25 + 16, m
