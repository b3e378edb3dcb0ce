"""scripts/estimate_memory.py: per-device memory of the compiled training step, from shapes
alone (8 fake CPU devices from conftest; tiny one-layer configs, so each compile is seconds)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ("--layers", "1", "--batch", "8", "--seq", "16")


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("estimate_memory",
                                                  ROOT / "scripts" / "estimate_memory.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def _estimate(mod, *argv):
    args, overrides = mod.parse_args(list(argv))
    return mod.estimate(args, overrides, log=lambda _: None)


@pytest.fixture(scope="module")
def full_fsdp8(mod):
    return _estimate(mod, "configs/sft_synthetic.py", "--mesh", "fsdp=8", *SMALL)


def test_fsdp_shards_params_and_adamw_state(full_fsdp8):
    row = full_fsdp8
    tot, dev = row["total_bytes"], row["per_device_bytes"]
    assert row["n_devices"] == 8 and row["mesh"] == {"fsdp": 8}
    assert row["peft_method"] == "full" and row["model"]["num_layers"] == 1
    assert row["trainable_params"] == row["params"]
    assert tot["params_trainable"] == 4 * row["params"]  # float32
    assert dev["params_frozen"] == 0
    # Every leaf here has a dimension divisible by 8 on an fsdp-sharded axis (norm scales
    # included), so each device holds exactly an eighth.
    assert dev["params_trainable"] == tot["params_trainable"] // 8
    # AdamW: mu and nu per trainable param (plus the step counts).
    assert dev["optimizer_state"] == pytest.approx(2 * dev["params_trainable"], abs=64)
    assert tot["optimizer_state"] == pytest.approx(2 * tot["params_trainable"], abs=64)


def test_compiled_step_analysis_matches_the_state(full_fsdp8):
    dev, x = full_fsdp8["per_device_bytes"], full_fsdp8["xla_per_device_bytes"]
    assert dev["activations_xla_temp"] == x["temp"] > 0
    state = dev["params"] + dev["optimizer_state"] + dev["state_other"]
    # The step's arguments are the state and the batch, per device; the state is donated.
    assert x["argument"] == pytest.approx(state + dev["batch"], rel=0.01)
    assert x["alias"] == pytest.approx(state, rel=0.01)
    assert x["peak"] == x["argument"] + x["output"] - x["alias"] + x["temp"]


def test_lora_has_far_smaller_optimizer_state_and_prints_json(mod, full_fsdp8, capsys):
    row = mod.main(["configs/sft_synthetic.py", "--peft", "lora", "--mesh", "fsdp=8", *SMALL,
                    "--json"])
    out = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(out) == 1 and json.loads(out[0]) == json.loads(json.dumps(row))
    full = full_fsdp8
    assert row["peft_method"] == "lora" and 0 < row["trainable_params"] < row["params"] / 5
    assert row["total_bytes"]["params_frozen"] == full["total_bytes"]["params_trainable"]
    assert row["total_bytes"]["optimizer_state"] == pytest.approx(
        2 * row["total_bytes"]["params_trainable"], abs=64)
    assert row["total_bytes"]["optimizer_state"] < full["total_bytes"]["optimizer_state"] / 5
    assert row["per_device_bytes"]["optimizer_state"] < \
        full["per_device_bytes"]["optimizer_state"] / 2
    assert row["per_device_bytes"]["activations_xla_temp"] > 0
    assert "optimizer state" in mod.table(row)


def test_presets_and_bad_arguments(mod):
    args, overrides = mod.parse_args(["llama-7b", "--mesh", "data=2,fsdp=4",
                                      "--config.model.remat=dots"])
    assert (args.config, args.mesh, overrides) == ("llama-7b", "data=2,fsdp=4",
                                                   [("model.remat", "dots")])
    cfg, is_preset = mod.load_config("llama-7b", args, overrides)
    assert is_preset and cfg.model.hidden_size == 4096 and cfg.model.remat == "dots"
    assert cfg.train.seq_len == mod.PRESET_SEQ and dict(cfg.mesh) == {"data": 2, "fsdp": 4}
    with pytest.raises(SystemExit):
        mod.parse_args(["tiny", "--bogus"])
