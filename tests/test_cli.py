"""The command line: typed config arguments, overrides, rejections, resolved config, resume."""
import json
import subprocess
import sys
import pathlib

import pytest

from ftjax import main as ftmain

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--config.model.hidden_size=32", "--config.model.intermediate_size=64",
         "--config.model.num_layers=1", "--config.data.n_per_task=100",
         "--config.data.eval_examples=8", "--config.data.max_new_tokens=4",
         "--config.train.batch_size=8", "--config.train.log_every=1",
         "--config.train.progress=False", "--config.optimizer.warmup_steps=1"]


def test_cli_runs_writes_config_and_resumes(tmp_path):
    wd = str(tmp_path)
    args = ["--config", "configs/sft_synthetic.py:tasks=reverse,steps=3", "--workdir", wd] + SMALL
    first = ftmain.main(args)
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["train"]["steps"] == 3 and cfg["data"]["tasks"] == ["reverse"]
    assert cfg["model"]["hidden_size"] == 32
    assert (tmp_path / "config_hash.txt").read_text().strip() == cfg["_hash"]
    assert first["resumed_from"] is None and 0.0 <= first["exact_match"] <= 1.0
    assert (tmp_path / "summary.json").exists() and (tmp_path / "checkpoints" / "3").exists()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    # Same workdir, more steps: resumes from step 3 and trains steps 4-5 only.
    more = ftmain.main(args[:1] + ["configs/sft_synthetic.py:tasks=reverse,steps=5"] + args[2:])
    assert more["resumed_from"] == 3
    assert len(list(tmp_path.glob("config.*.json"))) == 1  # the old config was kept


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ftjax.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,expect", [
    (["--config.train.stepz=3"], "train.stepz"),
    (["--config.train.steps=three"], "train.steps"),
    (["--config.model.scan_layers=maybe"], "model.scan_layers"),
    (["--config.nosuch.key=1"], "nosuch"),
])
def test_bad_overrides_are_rejected_by_name(tmp_path, args, expect):
    r = _cli("--config", "configs/sft_synthetic.py", "--workdir", str(tmp_path), *args)
    assert r.returncode != 0
    assert expect in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()  # nothing ran


def test_bad_typed_argument_is_rejected(tmp_path):
    r = _cli("--config", "configs/sft_synthetic.py:stepz=3", "--workdir", str(tmp_path))
    assert r.returncode != 0 and "stepz" in r.stderr


def test_indivisible_mesh_fails_before_compiling(tmp_path):
    with pytest.raises(ValueError, match="not divisible"):
        ftmain.main(["--config", "configs/sft_synthetic.py", "--workdir", str(tmp_path),
                     "--config.mesh.data=1", "--config.mesh.tensor=8",
                     "--config.sharding.rules=fsdp_tp"])


def test_quickstart_peft_argument_brings_the_method_section():
    from ftjax.config_utils import apply_overrides, load_config
    from ftjax.peft import get_method
    c = load_config("configs/quickstart.py:peft=lora")
    assert c.peft.method == "lora" and c.peft.rank > 0
    c = apply_overrides(c, [("peft.rank", "4")])
    assert get_method(c.peft).transform.keywords["rank"] == 4
    assert load_config("configs/quickstart.py").peft.method == "full"
    with pytest.raises(ValueError, match="peft.method='nope' is not known"):
        load_config("configs/quickstart.py:peft=nope")
