"""The quickstart: at reduced size it still learns an unseen task; in-run pretraining caches.

These run the real pipeline through `ftjax.main.main` (the CLI), on the 8 fake CPU devices of
conftest.py, with the shipped base model (experiments/quickstart_base/model.safetensors).
"""
import json
import os

import pytest

from ftjax import main as ftmain
from ftjax.trainers import _quickstart_base as quickstart
from ftjax.io.params_file import load_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quickstart.py")
SHIPPED = os.path.join(REPO, "experiments", "quickstart_base", "model.safetensors")


def _run(workdir, arg="", *overrides):
    spec = CONFIG + (f":{arg}" if arg else "")
    return ftmain.main(["--config", spec, "--workdir", str(workdir),
                        "--config.train.progress=false", "--config.train.tensorboard=false",
                        *overrides])


def test_shipped_base_is_small_and_matches_the_config():
    from configs import quickstart as qs_config
    from ftjax.train.run import model_config
    assert os.path.getsize(SHIPPED) < 4 * 2**20
    cfg, _ = load_params(SHIPPED, expected_cfg=model_config(qs_config.base_model()))
    meta = quickstart.read_metadata(SHIPPED)
    assert set(meta["exact_match"]) == set(meta["pretrain"]["tasks"])
    assert "dmy2iso" not in meta["pretrain"]["tasks"]  # the quickstart's task is unseen
    # configs/quickstart.py describes how the shipped base was made (so `:pretrain` remakes it).
    b = qs_config.get_config().base
    assert meta["pretrain"] == {
        "tasks": list(b.tasks), "n_per_task": b.n_per_task, "seed": b.seed,
        "test_frac": b.test_frac, "steps": b.train.steps, "batch_size": b.train.batch_size,
        "seq_len": b.train.seq_len, "learning_rate": b.optimizer.learning_rate}
    assert min(meta["exact_match"].values()) >= 0.5  # the base does every pretraining task


def test_quickstart_reduced_size_learns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the shipped base must be found from any cwd
    summary = _run(tmp_path / "qs", "steps=60,eval_examples=64",
                   "--config.train.eval_every=30", "--config.data.other_tasks=format",
                   "--config.data.other_eval_examples=16")
    assert summary["base_model"]["source"] == "file"
    assert summary["steps"] == 60
    before, after = summary["exact_match_before"], summary["exact_match_after"]
    assert after >= before + 0.5, (before, after)
    assert summary["final_eval_loss"] < 0.5 * summary["eval_loss_before"]
    on_disk = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert on_disk["exact_match_after"] == after
    assert on_disk["wall_time_s"] > 0 and on_disk["config_hash"]
    assert set(on_disk["other_tasks"]) == {"format"}
    assert len(on_disk["samples"]) == 5
    png = tmp_path / "qs" / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_base_file_fails_with_a_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="base.path= "):
        _run(tmp_path, "", "--config.base.path=no/such/model.safetensors")


def test_base_of_another_architecture_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="hidden_size.*base.path= "):
        _run(tmp_path, "", "--config.model.hidden_size=64")


TINY = ("--config.model.hidden_size=32", "--config.model.intermediate_size=64",
        "--config.model.num_layers=1", "--config.base.train.steps=4",
        "--config.base.optimizer.warmup_steps=1", "--config.base.n_per_task=64",
        "--config.base.eval_examples=4", "--config.base.train.eval_every=2",
        "--config.base.train.log_every=2", "--config.base.train.progress=false",
        "--config.base.train.tensorboard=false", "--config.optimizer.warmup_steps=0",
        "--config.train.eval_every=2", "--config.train.log_every=1",
        "--config.data.other_eval_examples=4", "--config.data.other_tasks=add")


@pytest.mark.slow  # two end-to-end runs (~2 x 30 s of compilation on 2 loaded cores)
def test_in_run_pretraining_writes_and_reuses_the_cached_base(tmp_path):
    summary = _run(tmp_path, "pretrain,steps=2,eval_examples=8", *TINY)
    assert summary["base_model"]["source"] == "pretrained"
    path = summary["base_model"]["path"]
    assert os.path.dirname(path).startswith(str(tmp_path / "base_"))
    cfg, params = load_params(path)
    assert cfg.hidden_size == 32 and cfg.num_layers == 1
    meta = quickstart.read_metadata(path)
    assert meta["pretrain"]["steps"] == 4 and set(meta["exact_match"]) == set(
        meta["pretrain"]["tasks"])
    assert [s for s, _ in meta["loss_curve"]] == [2, 4]
    mtime = os.path.getmtime(path)

    # Same base settings, more fine-tuning steps: the cached base is reused, not retrained.
    again = _run(tmp_path, "pretrain,steps=3,eval_examples=8", *TINY)
    assert again["base_model"]["source"] == "cached"
    assert again["base_model"]["path"] == path and os.path.getmtime(path) == mtime
    assert again["steps"] == 3 and again["resumed_from"] == 2
    assert (tmp_path / "loss_curves.png").exists()
