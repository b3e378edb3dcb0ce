"""Workdirs on any filesystem epath serves: the helpers, and a whole run in an emulated gs:// bucket."""
import json
import os
import pathlib

import pytest

from ftjax import main as ftmain
from ftjax import workdir

from _fake_gcs import install, uninstall

SMALL = ["--config.model.hidden_size=32", "--config.model.intermediate_size=64",
         "--config.model.num_layers=1", "--config.data.n_per_task=100",
         "--config.data.eval_examples=8", "--config.data.max_new_tokens=4",
         "--config.train.batch_size=8", "--config.train.log_every=1",
         "--config.train.progress=False", "--config.optimizer.warmup_steps=1"]


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """An emulated gs:// bucket under tmp_path/bucket; the test runs in tmp_path/cwd."""
    root = tmp_path / "bucket"
    root.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    spy = install(monkeypatch, str(root))
    yield root, cwd, spy
    monkeypatch.undo()
    uninstall()


def test_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(workdir.path("gs://b/run", "checkpoints")) == "gs://b/run/checkpoints"
    assert workdir.is_remote("gs://b/run") and not workdir.is_remote("runs/a")
    assert os.fspath(workdir.path("runs/a")) == str(tmp_path / "runs" / "a")
    with pytest.raises(ValueError, match="workdir is empty"):
        workdir.path("")


def test_write_json_only_on_process_zero_and_atomic(tmp_path, monkeypatch):
    workdir.write_json(tmp_path / "run", "summary.json", {"a": 1})
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["summary.json"]  # no tmp
    monkeypatch.setattr(workdir, "is_primary", lambda: False)
    workdir.write_json(tmp_path / "run", "other.json", {"b": 2})
    assert not (tmp_path / "run" / "other.json").exists()
    workdir.write_text(tmp_path / "run", "mine.txt", "x", all_processes=True)
    assert (tmp_path / "run" / "mine.txt").read_text() == "x"


def test_helpers_write_into_the_bucket(bucket):
    root, cwd, spy = bucket
    workdir.write_json("gs://bkt/run", "summary.json", {"ok": True})
    assert json.loads((root / "bkt" / "run" / "summary.json").read_text()) == {"ok": True}
    assert workdir.read_json("gs://bkt/run", "summary.json") == {"ok": True}
    assert ("gs://bkt/run/summary.json", "w") in spy["opened"]
    assert not list(cwd.iterdir())


def _files(root: pathlib.Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_whole_run_and_resume_in_an_emulated_bucket(bucket):
    root, cwd, spy = bucket
    wd = "gs://bkt/runs/sft"
    args = ["--config", "configs/sft_synthetic.py:tasks=reverse,steps=3", "--workdir", wd] + SMALL
    first = ftmain.main(args)
    run = root / "bkt" / "runs" / "sft"
    files = _files(run)
    assert not list(cwd.iterdir()), f"files leaked into the current directory: {_files(cwd)}"
    for name in ("config.json", "config_hash.txt", "metrics.jsonl", "summary.json",
                 "checkpoints/3/_CHECKPOINT_METADATA"):
        assert name in files, sorted(files)
    assert any(f.startswith("tb/events.out.tfevents") for f in files)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["_hash"] == (run / "config_hash.txt").read_text().strip()
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert first["resumed_from"] is None
    # orbax reached tensorstore with the URL, and took the GCS commit protocol.
    assert spy["kvstores"] and all(k.startswith(wd + "/checkpoints/") for k in spy["kvstores"])
    assert "checkpoints/3/commit_success.txt" in files
    assert all(url.startswith("gs://bkt/") for url, _ in spy["opened"])

    more = ftmain.main(args[:1] + ["configs/sft_synthetic.py:tasks=reverse,steps=5"] + args[2:])
    assert more["resumed_from"] == 3
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5]  # the remote metrics file was continued, not replaced
    assert "checkpoints/5/_CHECKPOINT_METADATA" in _files(run)
    assert len([f for f in _files(run) if f.startswith("config.") and f.endswith(".json")]) == 2
    assert not list(cwd.iterdir())
