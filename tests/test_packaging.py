"""Packaging: the `ftjax` console script, and configs/assets found from any directory."""
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

from ftjax import cli, config_utils, paths
from ftjax import main as ftmain

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_console_script_targets_the_cli_entry_point():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = meta["project"]["scripts"]["ftjax"]
    module, _, func = target.partition(":")
    assert (module, func) == ("ftjax.main", "cli") and callable(getattr(ftmain, func))


def test_root_is_the_checkout_and_env_var_wins(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.ENV_VAR, raising=False)
    assert paths.root() == str(ROOT)
    (tmp_path / "configs").mkdir()
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path))
    assert paths.root() == str(tmp_path)


def test_relative_paths_resolve_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(paths.ENV_VAR, raising=False)
    base = "experiments/quickstart_base/model.safetensors"
    assert paths.resolve(base) == str(ROOT / base)
    assert paths.resolve("gs://b/x") == "gs://b/x"
    assert paths.resolve("no/such/file") == "no/such/file"  # the caller's error names it
    (tmp_path / "experiments").mkdir()
    local = tmp_path / "mine.jsonl"
    local.write_text("{}\n")
    assert paths.resolve("mine.jsonl") == "mine.jsonl"  # the current directory comes first
    cfg = config_utils.load_config("configs/sft_synthetic.py:tasks=reverse,steps=3")
    assert cfg.train.steps == 3
    with pytest.raises(FileNotFoundError, match="configs/nope.py"):
        config_utils.load_config("configs/nope.py")


def test_help_lists_the_configs(capsys):
    assert ftmain.main(["--help"]) is None
    out = capsys.readouterr().out
    assert "--workdir" in out and "--config.KEY=VALUE" in out
    assert "configs/quickstart.py" in out and "configs/lora_sft.py" in out
    assert "\n  configs/common.py\n" not in out  # a helper, not an experiment
    assert [p for p, _ in cli.list_configs()] == sorted(
        f"configs/{p.name}" for p in (ROOT / "configs").glob("*.py")
        if not p.name.startswith("_") and p.name != "common.py")
    # Each config's whole purpose paragraph and its typed arguments with types and defaults.
    flat = " ".join(out.split())
    assert ("Bottleneck-adapter fine-tuning (Houlsby et al. 2019 serial; He et al. 2022 "
            "parallel) of the quickstart base" in flat)
    assert "rank:int=8 alpha:float=16.0 rslora:bool=False" in flat
    assert "task:str=dmy2iso steps:int=150" in flat  # configs/quickstart.py
    for path, purpose in cli.list_configs():
        assert purpose, f"{path} has no docstring purpose"
        assert "arguments unavailable" not in cli._arguments_line(path), path


def test_help_for_one_config(capsys):
    assert ftmain.main(["--config", "configs/lora_sft.py", "--help"]) is None
    out = capsys.readouterr().out
    assert out.startswith("configs/lora_sft.py") and "base=False" in out  # the docstring
    assert "typed arguments" in out and "loraplus_ratio:float=0.0" in out
    assert config_utils.config_arguments("configs/sft_synthetic.py") == dict(
        tasks="add+reverse", steps=300, family="llama", init="scratch")


def test_cli_from_another_directory_help_and_one_line_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # as an installed package would be found
    run = lambda *a: subprocess.run([sys.executable, "-c", "from ftjax.main import cli; cli()",
                                     *a], cwd=tmp_path, env=env, capture_output=True, text=True,
                                    timeout=120)
    r = run("--help")
    assert r.returncode == 0 and "configs/sft_file.py" in r.stdout, r.stderr[-2000:]
    r = run("--config", "configs/sft_synthetic.py", "--workdir", str(tmp_path / "w"),
            "--config.train.stepz=1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line, no traceback
    assert "train.stepz" in r.stderr and "did you mean 'train.steps'" in r.stderr
    assert not (tmp_path / "w").exists() and not (tmp_path / "configs").exists()
