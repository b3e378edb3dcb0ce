"""Bad inputs, as the user meets them on the command line: each exits non-zero with one line
naming the file or key and the fix (no traceback), before anything slow runs, and leaves
nothing behind that breaks the corrected rerun."""
import glob
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from ftjax import cli
from ftjax import main as ftmain

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = ROOT / "experiments" / "quickstart_base" / "model.safetensors"
# A tiny from-scratch run of configs/sft_file.py (2 steps, no evaluation, no checkpoint).
TINY = ["--config.model.hidden_size=32", "--config.model.intermediate_size=64",
        "--config.model.num_layers=1", "--config.train.batch_size=8",
        "--config.train.seq_len=32", "--config.train.eval_every=0",
        "--config.train.tensorboard=False", "--config.data.min_train_examples=1",
        "--config.data.splits.ratios=(1.0,)", "--config.optimizer.warmup_steps=0"]


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `ftjax ARGV`, run in this process as the console
    script runs it (`cli.run_main`)."""
    code = 0
    try:
        cli.run_main(lambda: ftmain.main([str(a) for a in argv]))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code, err):
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert "Traceback" not in err
    return err


def sft_file(path, **arg):
    spec = ",".join([f"path={path}", "init=scratch", "steps=2", "eval_examples=0"]
                    + [f"{k}={v}" for k, v in arg.items()])
    return ["--config", f"configs/sft_file.py:{spec}", "--config.optimizer.warmup_steps=0"]


# ------------------------------------------------------------------------------------------
# Config: one validation pass before anything runs


def test_every_shipped_config_passes_validation_and_preflight():
    from ftjax import config_utils, peft
    from ftjax.train import preflight
    from ftjax.trainers import resolve_config, validate_config
    specs = [p for p in sorted(glob.glob(str(ROOT / "configs" / "*.py")))
             if os.path.basename(p) not in ("common.py", "__init__.py")]
    specs += [f"{ROOT}/configs/sft_file.py:peft={m}" for m in peft.method_names()]
    for spec in specs:
        cfg = resolve_config(config_utils.load_config(spec))
        validate_config(cfg)
        preflight.check(cfg)  # mesh, batch and the shipped base's header


@pytest.mark.parametrize("overrides,named", [
    (["--config.optimizer.learning_rate=nan"], "optimizer.learning_rate=nan is not a finite"),
    (["--config.train.steps=-5", "--config.optimizer.schedule=constant"],
     "train.steps=-5 must be >= 1"),
    (["--config.optimizer.b2=inf"], "optimizer.b2=inf is not a finite"),
    (["--config.train.seq_len=1"], "train.seq_len=1 must be >= 2"),
    (["--config.train.log_every=0"], "train.log_every=0 must be >= 1"),
    (["--config.train.accum_steps=3"], "train.batch_size=16 is not divisible by "
                                        "train.accum_steps=3"),
    (["--config.optimizer.warmup_steps=500"], "optimizer.warmup_steps=500 must be smaller "
                                              "than train.steps=150"),
    (["--config.peft.method=lora", "--config.peft.rank=0"], "peft.rank=0 must be >= 1"),
    (["--config.peft.method=lora", "--config.peft.dropout=1.5"],
     "peft.dropout=1.5 must be in [0, 1)"),
    (["--config.optimizer.name=adamx"], "optimizer.name='adamx' must be one of"),
    (["--config.data.splits.ratios=(0.9, 0.2)"], "data.splits.ratios=(0.9, 0.2) must be "
                                                  "positive and sum to 1"),
    (["--config.data.pack_window=0"], "data.pack_window=0 must be >= 1"),
])
def test_impossible_settings_are_refused_before_anything_runs(tmp_path, capsys, overrides,
                                                              named):
    code, out, err = run_cli(capsys, "--config", "configs/sft_file.py", "--workdir",
                             tmp_path / "wd", *overrides)
    err = one_line_error(code, err)
    assert named in err and "--config." in err  # the key, the value and the flag to fix it
    assert not (tmp_path / "wd").exists()  # nothing written: the corrected rerun starts clean


@pytest.mark.parametrize("overrides,named", [
    (["--config.dpo.beta=0"], "dpo.beta=0.0 must be > 0"),
    (["--config.dpo.label_smoothing=0.7"], "dpo.label_smoothing=0.7 must be in [0, 0.5)"),
    (["--config.dpo.reference=none"], "dpo.reference='none' must be one of"),
    (["--config.dpo.loss_type=('sigmoidd',)"], "dpo.loss_type: unknown ['sigmoidd']"),
])
def test_impossible_preference_settings_are_refused_before_anything_runs(tmp_path, capsys,
                                                                         overrides, named):
    code, out, err = run_cli(capsys, "--config", "configs/dpo_file.py", "--workdir",
                             tmp_path / "wd", *overrides)
    assert named in one_line_error(code, err)
    assert not (tmp_path / "wd").exists()


def test_mesh_mistake_is_reported_before_the_data_stage(tmp_path, capsys):
    bad_csv = tmp_path / "bad.csv"  # would fail in the data stage, which must not start
    bad_csv.write_text("question,reply\nhi,there\n")
    code, out, err = run_cli(capsys, *sft_file(bad_csv), "--workdir", tmp_path / "wd",
                             "--config.train.batch_size=12")  # 8 devices in the tests
    assert "not divisible by the batch mesh axes" in one_line_error(code, err)
    assert not (tmp_path / "wd").exists()


# ------------------------------------------------------------------------------------------
# Data files


def test_data_and_config_mistakes_then_the_corrected_rerun_in_the_same_workdir(tmp_path,
                                                                              capsys):
    wd, data = tmp_path / "wd", tmp_path / "qa.csv"
    rows = "".join(f"add {i} and 1,{i + 1}\n" for i in range(24))
    data.write_text("question,reply\n" + rows)
    code, _, err = run_cli(capsys, *sft_file(data), "--workdir", wd, *TINY)
    err = one_line_error(code, err)
    assert f"{data}:2: cannot detect the data format from columns ['question', 'reply']" in err
    assert "--config.data.field_map=" in err
    # The header fixed; a config mistake next, in the same workdir.
    data.write_text("instruction,output\n" + rows)
    code, _, err = run_cli(capsys, *sft_file(data), "--workdir", wd, *TINY,
                           "--config.optimizer.learning_rate=nan")
    assert "optimizer.learning_rate=nan" in one_line_error(code, err)
    code, out, err = run_cli(capsys, *sft_file(data), "--workdir", wd, *TINY)
    assert code == 0, err
    assert "train step 1/2 loss " in out  # the first step is reported at once
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["final_loss"] is not None and np.isfinite(summary["final_loss"])


def test_a_jsonl_line_cut_short_is_reported_within_the_line(tmp_path, capsys):
    lines = [json.dumps({"instruction": f"add {i} and 1", "output": str(i + 1)})
             for i in range(6)]
    cut = lines[2][:20]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:2] + [cut] + lines[3:]) + "\n")
    # A line cut after a complete value: Python's error is at the next line's column 1.
    done = json.dumps({"instruction": "add 9 and 1", "output": "10"})[:-1]
    (tmp_path / "b.jsonl").write_text("\n".join(lines[:3] + [done] + lines[3:]) + "\n")
    for name, line, col in [("a.jsonl", 3, len(cut)), ("b.jsonl", 4, len(done))]:
        code, _, err = run_cli(capsys, *sft_file(tmp_path / name), "--workdir",
                               tmp_path / name.replace(".", "_"))
        err = one_line_error(code, err)
        assert f"{tmp_path / name}:{line}: malformed JSON: the line ends at column {col} " in err


# ------------------------------------------------------------------------------------------
# Weight files


def test_a_truncated_params_file_is_named_before_anything_runs(tmp_path, capsys):
    data = BASE.read_bytes()
    cut = tmp_path / "base.safetensors"
    cut.write_bytes(data[:len(data) // 2])
    code, _, err = run_cli(capsys, "--config", "configs/sft_file.py", "--workdir",
                           tmp_path / "wd", f"--config.model.init_from={cut}")
    err = one_line_error(code, err)
    assert (f"{cut}: truncated: its header says the file holds {len(data):,} bytes, it has "
            f"{len(data) // 2:,}; re-download it") in err
    # The quickstart's base file too, before it is read for its metadata.
    code, _, err = run_cli(capsys, "--config", "configs/quickstart.py", "--workdir",
                           tmp_path / "wd", f"--config.base.path={cut}")
    assert f"{cut}: truncated" in one_line_error(code, err)
    assert not (tmp_path / "wd").exists()


def test_a_truncated_hf_shard_is_named_before_anything_runs(tmp_path, capsys):
    from ftjax import models
    from ftjax.io.hf import save_pretrained
    from ftjax.models.config import preset
    cfg = preset("llama", None, vocab_size=128, hidden_size=32, intermediate_size=64,
                 num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=64)
    params = jax.device_get(models.init(cfg, jax.random.PRNGKey(0)))
    hf = tmp_path / "hf"
    names = save_pretrained(str(hf), cfg, params, shard_size_mb=0.02)
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) >= 2  # a sharded checkpoint, with an index
    shard = hf / shards[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    code, _, err = run_cli(capsys, *sft_file(tmp_path / "none.csv"), "--workdir",
                           tmp_path / "wd", f"--config.model.init_from=hf:{hf}")
    err = one_line_error(code, err)
    assert f"{shard}: truncated: its header says the file holds" in err
    assert "re-download the checkpoint" in err and not (tmp_path / "wd").exists()


def test_debug_env_var_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FTJAX_DEBUG", "1")
    with pytest.raises(ValueError, match="train.steps=0 must be >= 1"):
        cli.run_main(lambda: ftmain.main(["--config", "configs/sft_file.py", "--workdir",
                                          str(tmp_path), "--config.train.steps=0"]))
