"""scripts/benchmark.py runs end to end and prints one sane JSON line (never a timing assertion)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from ftjax.models.config import SIZES

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

FIELDS = ("preset", "mode", "batch", "seq", "params", "step_time_median_s", "tokens_per_s",
          "compile_s", "mfu", "peak_rss_mb", "backend", "device_kind", "n_devices",
          "jax_version", "peak_flops", "peak_flops_source")


def analytical_params(size: str) -> int:
    """Llama with untied embeddings: embed + lm_head + L * (attention + SwiGLU + 2 norms) + norm."""
    s = SIZES[size]
    v, d, f, n_layers = s["vocab_size"], s["hidden_size"], s["intermediate_size"], s["num_layers"]
    hd = d // s["num_heads"]
    q, kv = s["num_heads"] * hd, s["num_kv_heads"] * hd
    layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
    return 2 * v * d + n_layers * layer + d


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # One CPU device (conftest asks for 8 fake ones, which a batch of 1 cannot be split over).
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_analytical_param_counts():
    assert analytical_params("tiny") == 7_096_576
    assert analytical_params("small") == 56_369_664


def test_benchmark_full_tiny_prints_one_sane_json_line():
    cmd = [sys.executable, str(SCRIPTS / "benchmark.py"), "--preset", "tiny", "--mode", "full",
           "--batch", "1", "--seq", "64", "--steps", "2", "--warmup", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"stdout must be exactly one JSON line, got:\n{proc.stdout}"
    row = json.loads(lines[0])

    missing = [k for k in FIELDS if k not in row]
    assert not missing, f"missing fields {missing} in {row}"
    assert (row["preset"], row["mode"], row["batch"], row["seq"]) == ("tiny", "full", 1, 64)
    assert row["params"] == analytical_params("tiny")
    assert row["backend"] == "cpu" and row["n_devices"] == 1
    for k in ("step_time_median_s", "tokens_per_s", "compile_s", "mfu", "peak_rss_mb",
              "peak_flops"):
        assert isinstance(row[k], (int, float)) and math.isfinite(row[k]) and row[k] > 0, (k, row)
    assert row["tokens_per_s"] == pytest.approx(64 / row["step_time_median_s"])
    assert row["mfu"] < 1.5  # a sanity bound on the formula, not a performance claim
    assert row["flops_convention"] == "6N+attn (PaLM)"  # full: the PaLM figure itself
    assert row["flops_per_token_6n"] == row["flops_per_token"] and row["mfu_6n"] == row["mfu"]
    assert row["peak_rss_mb"] > 50
    if row["peak_rss_steps_mb"] is not None:  # Linux: the timed steps' own peak
        assert 0 < row["peak_rss_steps_mb"] <= row["peak_rss_mb"]
    # The real step: random tokens start near log(V), AdamW steps lower the loss, and the old
    # state's buffers were donated.
    assert abs(row["loss_first"] - math.log(SIZES["tiny"]["vocab_size"])) < 0.5
    assert row["loss_last"] < row["loss_first"]
    assert row["donated"] is True


def test_torch_reference_presets_mirror_ftjax_sizes():
    mod = _load_script("benchmark_torch")
    hf_names = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                "num_kv_heads": "num_key_value_heads"}
    for size, fields in SIZES.items():
        assert mod.PRESETS[size] == {hf_names.get(k, k): v for k, v in fields.items()}


@pytest.mark.parametrize("size", sorted(SIZES))
def test_lora_modes_train_the_same_adapters(size):
    """benchmark_torch.py --mode lora (PEFT) and benchmark.py --mode lora adapt the same
    kernels at the same rank and alpha, so they train the same number of params."""
    import functools

    import jax

    from ftjax import models
    from ftjax.peft import core as peft_core
    from ftjax.peft.lora import apply_lora

    ft, pt = _load_script("benchmark"), _load_script("benchmark_torch")
    assert (pt.LORA_RANK, float(pt.LORA_ALPHA)) == (ft.LORA_RANK, ft.LORA_ALPHA)
    cfg = models.preset("llama", size=size, tie_embeddings=False)
    # The same modules: each PEFT target name is one ftjax target kernel and back.
    ft_targets = [p for p in peft_core.weight_paths(models.param_shapes(cfg))
                  if peft_core.matches(p, peft_core.compile_patterns(ft.LORA_TARGETS))]
    assert sorted(p.split("/")[-2] for p in ft_targets) == sorted(pt.LORA_TARGETS)
    transform = functools.partial(apply_lora, rank=ft.LORA_RANK, alpha=ft.LORA_ALPHA,
                                  targets=ft.LORA_TARGETS)
    params = jax.eval_shape(transform, models.param_shapes(cfg), jax.random.PRNGKey(0))
    trainable = peft_core.partition(params, peft_core.trainable_mask(params, ()))[0]
    _, n_params, n_trainable = pt.build_model(size, "lora", device="meta")  # shapes only
    assert n_params == analytical_params(size)
    assert n_trainable == peft_core.count(trainable) > 0


def _run_benchmark(*args: str) -> dict:
    cmd = [sys.executable, str(SCRIPTS / "benchmark.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"stdout must be exactly one JSON line, got:\n{proc.stdout}"
    return json.loads(lines[0])


def mixtral_tiny_counts(seq: int) -> tuple[int, int, float]:
    """(params, active params per token, training FLOPs per token) of the mixtral-tiny preset,
    by hand: top-2 of 8 SwiGLU experts, the router [d, E] a matmul, PaLM's 6N + 12LTA."""
    v, d, f, n_layers, e, k = 8192, 256, 512, 4, 8, 2
    q, kv = 4 * 64, 2 * 64
    attn = d * q + 2 * d * kv + q * d
    expert = 3 * d * f
    layer_fixed = attn + d * e + 2 * d               # attention, router, two norms
    params = 2 * v * d + n_layers * (layer_fixed + e * expert) + d
    active = 2 * v * d + n_layers * (layer_fixed + k * expert) + d
    matmul = n_layers * (attn + d * e + k * expert) + d * v  # + the LM head
    return params, active, 6.0 * matmul + 12.0 * n_layers * seq * q


@pytest.mark.slow
@pytest.mark.parametrize("mode, dispatch", [("full", "dropless"), ("lora", "capacity")])
def test_benchmark_mixtral_tiny_prints_moe_fields(mode, dispatch):
    seq = 32
    row = _run_benchmark("--preset", "mixtral-tiny", "--mode", mode, "--dispatch", dispatch,
                         "--batch", "1", "--seq", str(seq), "--steps", "1", "--warmup", "1")
    missing = [k for k in FIELDS + ("dispatch", "experts", "top_k", "active_params_per_token",
                                    "flops_per_token", "moe_dropped", "moe_aux_loss")
               if k not in row]
    assert not missing, f"missing fields {missing} in {row}"
    params, active, flops = mixtral_tiny_counts(seq)
    assert (row["preset"], row["mode"], row["dispatch"]) == ("mixtral-tiny", mode, dispatch)
    assert (row["experts"], row["top_k"], row["expert_intermediate"]) == (8, 2, 512)
    assert row["params"] == params == 17_574_144
    assert row["active_params_per_token"] == active == 8_136_960
    if mode == "full":  # PaLM's 6N + attention, only active experts
        assert row["flops_convention"] == "6N+attn (PaLM)"
        assert row["flops_per_token"] == pytest.approx(flops, rel=1e-9)
    else:  # a frozen base: 4N + attention, and 6x the adapters of the k routed experts
        r, d, f, n_layers, e, k = 16, 256, 512, 4, 8, 2
        adapters = n_layers * r * ((d + 256) + 2 * (d + 128) + (256 + d)
                                   + k * (2 * (d + f) + (f + d)))
        assert row["flops_convention"] == "4N_frozen+6N_trainable+attn"
        assert row["flops_per_token"] == pytest.approx(
            flops - 2.0 * (flops - 12.0 * n_layers * seq * 256) / 6.0 + 6.0 * adapters,
            rel=1e-9)
    assert row["flops_per_token_6n"] == pytest.approx(flops, rel=1e-9)
    assert row["mfu_6n"] == pytest.approx(row["mfu"] * flops / row["flops_per_token"])
    assert 0 < row["mfu"] < 1.5 and row["tokens_per_s"] > 0
    # Random init: the loss starts near log(V) and an AdamW step lowers it; the balance loss
    # is ~1 for near-uniform routing (E * sum f_e P_e).
    assert abs(row["loss_first"] - math.log(8192)) < 0.5
    assert row["loss_last"] < row["loss_first"]
    assert 0.9 < row["moe_aux_loss"] < 2.0
    assert row["donated"] is True
    if dispatch == "capacity":
        # C = ceil(1.25 * 32 * 2 / 8) = 10 slots: 8 * 10 slots for 2 * 32 assignments.
        assert row["capacity_slots"] == 10
        assert row["capacity_compute_ratio"] == pytest.approx(80 / 64)
        assert 0.0 <= row["moe_dropped"] < 0.5
    else:
        assert row["moe_dropped"] == 0.0
        assert row["grouped_impl"] == "blocks"  # auto on CPU (docs/moe.md)
    if mode == "lora":  # adapters on 4 attention projections and 3 stacked expert kernels
        r, d, f, n_layers, e = 16, 256, 512, 4, 8
        attn = r * ((d + 256) + 2 * (d + 128) + (256 + d))
        experts = e * r * (2 * (d + f) + (f + d))
        assert row["trainable_params"] == n_layers * (attn + experts)


def test_moe_flags_are_rejected_for_dense_presets():
    mod = _load_script("benchmark")
    with pytest.raises(SystemExit):
        mod.parse_args(["--preset", "tiny", "--dispatch", "capacity"])
    with pytest.raises(SystemExit):
        mod.parse_args(["--preset", "mixtral-tiny", "--capacity-factor", "2"])  # dropless
    args = mod.parse_args(["--preset", "mixtral-tiny", "--dispatch", "capacity"])
    assert (args.dispatch, args.capacity_factor) == ("capacity", 1.25)
    with pytest.raises(SystemExit):
        mod.parse_args(["--preset", "tiny", "--grouped-impl", "blocks"])
    with pytest.raises(SystemExit):
        mod.parse_args(["--preset", "mixtral-tiny", "--block-size", "0"])
    args = mod.parse_args(["--preset", "mixtral-tiny"])
    assert (args.grouped_impl, args.block_size) == ("auto", 128)
