"""Mixtral checkpoints (ftjax.io.hf): logit parity with transformers' MixtralForCausalLM.

Tiny random models (2 layers, 4 experts, top-2, GQA; CPU torch, float32) both ways and in both
file layouts: the Hub's per-expert `block_sparse_moe.experts.M.w1/w2/w3` (what transformers
5.24 `save_pretrained` writes) and transformers 5's fused `mlp.experts.gate_up_proj` /
`down_proj`. Tolerance as tests/test_hf_io.py: max |ftjax - transformers| over real positions
<= 1e-4 * max |transformers logit|. Also config mapping, the conversion script and errors that
list every problem.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers as tf
from safetensors.numpy import load_file, save_file  # noqa: E402
from safetensors.torch import save_file as torch_save_file  # noqa: E402

from ftjax import models  # noqa: E402
from ftjax.io import hf  # noqa: E402
from ftjax.io.params_file import flatten, load_params, unflatten  # noqa: E402
from ftjax.models.config import preset  # noqa: E402
from tests.test_hf_io import (V, _batch, _check_close, _convert, _ftjax_logits,  # noqa: E402
                              _hf_load, _hf_logits, _randomise_torch, _rewrite_config)

E, F = 4, 48
MIXTRAL = dict(vocab_size=V, hidden_size=64, intermediate_size=F, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               num_local_experts=E, num_experts_per_tok=2, router_aux_loss_coef=0.02,
               initializer_range=0.1)
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=F, num_layers=2, num_heads=4,
             num_kv_heads=2, max_position_embeddings=64, num_experts=E)


def _save_fused(model, path):
    """transformers 5's in-memory state dict (fused experts) as the checkpoint file."""
    model.config.save_pretrained(path)
    torch_save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                    str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def torch_mixtral():
    """A random Mixtral with randomised norms and a sliding window (4) shorter than T."""
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(**MIXTRAL, sliding_window=4)).eval()
    _randomise_torch(model)
    return model


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_import_matches_transformers(torch_mixtral, tmp_path, layout):
    path = tmp_path / layout
    if layout == "hub":
        torch_mixtral.save_pretrained(path)
        keys = load_file(path / "model.safetensors")
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys  # what HF writes
    else:
        _save_fused(torch_mixtral, path)
        assert "model.layers.1.mlp.experts.gate_up_proj" in load_file(path / "model.safetensors")
    cfg, params = hf.load_pretrained(path)
    assert (cfg.family, cfg.num_experts, cfg.num_experts_per_tok) == ("mixtral", E, 2)
    assert cfg.router == "topk_softmax" and cfg.moe_dispatch == "dropless"
    assert cfg.router_aux_loss_coef == 0.02 and cfg.sliding_window == 4
    assert cfg.rope_theta == 1e6 and cfg.intermediate_size == F
    moe = params["layers"]["moe"]
    assert moe["router"]["kernel"].shape == (2, 64, E)
    assert moe["gate_proj"]["kernel"].shape == (2, E, 64, F)
    assert moe["down_proj"]["kernel"].shape == (2, E, F, 64)
    # w1 (gate) of expert 3 in layer 1 is the [out, in] transpose of ftjax's [in, out] slice.
    gate_up = torch_mixtral.model.layers[1].mlp.experts.gate_up_proj.detach().numpy()
    np.testing.assert_array_equal(moe["gate_proj"]["kernel"][1, 3], gate_up[3, :F].T)
    np.testing.assert_array_equal(moe["up_proj"]["kernel"][1, 3], gate_up[3, F:].T)
    ids, mask, pos = _batch()
    _check_close(_ftjax_logits(params, cfg, ids, mask, pos),
                 _hf_logits(torch_mixtral, ids, mask, pos), mask, f"mixtral {layout} import")


def _random_ftjax_mixtral(**overrides):
    cfg = preset("mixtral", **{**SMALL, **overrides}, init_std=0.1)
    params = flatten(jax.device_get(models.init(cfg, jax.random.PRNGKey(3))))
    rng = np.random.RandomState(1)
    for k, v in params.items():  # norms away from 1
        if k.endswith("/scale"):
            params[k] = np.asarray(v) + 0.5 * rng.randn(*v.shape).astype(np.float32)
    return cfg, unflatten(params)


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_export_loads_in_transformers(tmp_path, layout):
    cfg, params = _random_ftjax_mixtral(sliding_window=6)
    files = hf.save_pretrained(tmp_path, cfg, params, moe_layout=layout,
                               extra_config={"bos_token_id": 1, "eos_token_id": 2})
    assert files == ["model.safetensors", "config.json", "generation_config.json"]
    keys = set(load_file(tmp_path / "model.safetensors"))
    per_expert = "model.layers.0.block_sparse_moe.experts.3.w3.weight"
    assert (per_expert in keys) == (layout == "hub")
    assert ("model.layers.0.mlp.experts.down_proj" in keys) == (layout == "fused")
    c = json.loads((tmp_path / "config.json").read_text())
    assert c["architectures"] == ["MixtralForCausalLM"] and c["model_type"] == "mixtral"
    assert (c["num_local_experts"], c["num_experts_per_tok"]) == (E, 2)
    assert c["router_aux_loss_coef"] == 0.02 and c["router_jitter_noise"] == 0.0
    assert c["sliding_window"] == 6 and c["rope_parameters"]["rope_theta"] == 1e6
    model, info = _hf_load(tmp_path)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                     "error_msgs")), info
    ids, mask, pos = _batch()
    _check_close(_ftjax_logits(params, cfg, ids, mask, pos), _hf_logits(model, ids, mask, pos),
                 mask, f"mixtral {layout} export")
    cfg2, params2 = hf.load_pretrained(tmp_path)
    assert cfg2 == cfg
    for k, v in flatten(params).items():
        np.testing.assert_array_equal(flatten(params2)[k], v, err_msg=k)


def test_config_mapping():
    cfg = preset("mixtral", **SMALL, expert_intermediate_size=32, num_experts_per_tok=3)
    c = hf.config_to_hf(cfg)
    assert c["intermediate_size"] == 32  # MixtralConfig's width is the expert's
    tf.MixtralConfig(**{k: v for k, v in c.items() if k not in ("architectures", "model_type")})
    back = hf.config_from_hf(c)
    assert back == cfg.replace(intermediate_size=32, expert_intermediate_size=None)
    # softmax over all E, top-k, renormalised is Mixtral's router (= softmax over the top k).
    c = hf.config_to_hf(cfg.replace(router="softmax_topk", router_renormalize=True))
    assert hf.config_from_hf(c).router == "topk_softmax"
    # transformers' class defaults for keys a config.json may omit, RoPE base 1e6 included
    minimal = {"architectures": ["MixtralForCausalLM"], "hidden_size": 64,
               "num_attention_heads": 16, "num_hidden_layers": 2}
    d = hf.config_from_hf(minimal)
    assert (d.num_experts, d.num_experts_per_tok, d.router_aux_loss_coef) == (8, 2, 0.001)
    assert d.rope_theta == 1e6 and d.num_kv_heads == 8 and d.sliding_window is None


def test_load_lists_every_problem(torch_mixtral, tmp_path):
    path = tmp_path / "bad"
    torch_mixtral.save_pretrained(path)
    f = path / "model.safetensors"
    t = load_file(f)
    del t["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    t["model.layers.0.block_sparse_moe.gate.weight"] = np.zeros((E + 1, 64), np.float32)
    t["model.layers.0.block_sparse_moe.experts.4.w1.weight"] = np.zeros((F, 64), np.float32)
    save_file(t, f, metadata={"format": "pt"})
    _rewrite_config(path, lambda c: c.update(router_jitter_noise=0.1))
    with pytest.raises(hf.HFCheckpointError) as e:
        hf.load_pretrained(path)
    msg = str(e.value)
    for needle in ("router_jitter_noise=0.1", "model.layers.1.block_sparse_moe.experts.2.w3",
                   "model.layers.0.block_sparse_moe.experts.4.w1", "has shape [5, 64], expected "
                   "[4, 64]", "MixtralForCausalLM"):
        assert needle in msg, (needle, msg)

    fused = tmp_path / "fused"
    _save_fused(torch_mixtral, fused)
    t = load_file(fused / "model.safetensors")
    key = "model.layers.0.mlp.experts.gate_up_proj"
    t[key] = t[key][:, 1:]
    save_file(t, fused / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf.HFCheckpointError) as e:
        hf.load_pretrained(fused)
    assert f"has shape [4, {2 * F - 1}, 64], expected [4, {2 * F}, 64]" in str(e.value)


def test_dense_checkpoint_labelled_mixtral(tmp_path):
    cfg = preset("llama", **{k: v for k, v in SMALL.items() if k != "num_experts"})
    hf.save_pretrained(tmp_path, cfg, models.init(cfg, jax.random.PRNGKey(0)))
    _rewrite_config(tmp_path, lambda c: c.update(architectures=["MixtralForCausalLM"],
                                                 model_type="mixtral"))
    with pytest.raises(hf.HFCheckpointError) as e:
        hf.load_pretrained(tmp_path)
    assert "dense MLP weights" in str(e.value) and "mixture-of-experts" in str(e.value)


def test_save_rejects_what_mixtral_cannot_express(tmp_path):
    cfg = preset("mixtral", **SMALL, num_shared_experts=1, router="softmax_topk",
                 router_jitter=0.01, qkv_bias=True)
    params = jax.device_get(models.init(cfg, jax.random.PRNGKey(0)))
    with pytest.raises(hf.HFCheckpointError) as e:
        hf.save_pretrained(tmp_path / "a", cfg, params, moe_layout="stacked")
    msg = str(e.value)
    for needle in ("num_shared_experts=1", "router='softmax_topk'", "qkv_bias=True",
                   "moe_layout='stacked'"):
        assert needle in msg, (needle, msg)
    assert "router_jitter" not in msg  # training-only, written as router_jitter_noise=0
    assert hf.config_to_hf(cfg.replace(num_shared_experts=0, router="topk_softmax",
                                       qkv_bias=False))["router_jitter_noise"] == 0.0
    dense_moe = preset("llama", **SMALL)  # an MoE config cannot be written as Llama
    with pytest.raises(hf.HFCheckpointError, match="num_experts=4"):
        hf.config_to_hf(dense_moe)
    assert not (tmp_path / "a").exists()


def test_convert_script_round_trip(torch_mixtral, tmp_path):
    src = tmp_path / "hf"
    torch_mixtral.save_pretrained(src)
    out = tmp_path / "model.safetensors"
    _convert("--to", "ftjax", "--hf", str(src), "--out", str(out))
    cfg, params = load_params(str(out))
    assert cfg.family == "mixtral" and cfg.num_experts == E
    _convert("--to", "hf", "--ckpt", str(out), "--out", str(tmp_path / "back"))
    model, info = _hf_load(tmp_path / "back")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask, pos = _batch()
    ref = _hf_logits(torch_mixtral, ids, mask, pos)
    _check_close(_hf_logits(model, ids, mask, pos), ref, mask, "convert_hf round trip")
    _check_close(_ftjax_logits(jax.tree.map(jnp.asarray, params), cfg, ids, mask, pos), ref, mask,
                 "convert_hf params file")


def test_run_config_from_a_mixtral_directory(torch_mixtral, tmp_path):
    """init_from=hf:DIR: the architecture is the checkpoint's, the MoE training choices the
    run's (a MixtralConfig has no dispatch, capacity or z-loss)."""
    torch_mixtral.save_pretrained(tmp_path)
    logged = []
    section = dict(preset("llama", **SMALL).to_dict(), moe_dispatch="capacity",
                   capacity_factor=1.0, router_z_loss_coef=1e-3, router_jitter=0.01,
                   router_aux_loss_coef=0.5, dtype="bfloat16")
    cfg = hf.model_config_from_section(section, str(tmp_path), log=logged.append)
    assert (cfg.family, cfg.num_experts, cfg.router_aux_loss_coef) == ("mixtral", E, 0.02)
    assert (cfg.moe_dispatch, cfg.capacity_factor, cfg.router_z_loss_coef) == ("capacity", 1.0,
                                                                               1e-3)
    assert cfg.router_jitter == 0.01 and cfg.dtype == "bfloat16"
    assert "router_aux_loss_coef=0.5 (checkpoint: 0.02)" in logged[0]
    assert "moe_dispatch" not in logged[0]
