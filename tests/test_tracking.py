"""Optional trackers (ftjax/tracking.py) fed by monitor.MetricWriter: W&B offline, MLflow file
store, off by default, clear errors. Offline only: nothing here reaches the network."""
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from ftjax import monitor, tracking
from ftjax.train import loop

CONFIG = {"trainer": "sft", "train": {"steps": 3, "log_every": 1, "patterns": ("a", "b")},
          "optimizer": {"learning_rate": 1e-3}, "note": "x" * 7000}
LOSSES = {0: 3.0, 1: 2.5, 2: 2.0}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B silent and offline, its user files in tmp_path (not the home directory)."""
    for name, value in (("WANDB_SILENT", "true"), ("WANDB_MODE", "offline"),
                        ("WANDB_CONFIG_DIR", tmp_path / "wandb_config"),
                        ("WANDB_CACHE_DIR", tmp_path / "wandb_cache"),
                        ("WANDB_DATA_DIR", tmp_path / "wandb_data")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # restored afterwards
    return tmp_path


def _write_run(workdir, **settings):
    with monitor.MetricWriter(workdir, tensorboard=False, tracking=settings,
                              config=ml_collections.ConfigDict(CONFIG)) as w:
        for step, loss in LOSSES.items():
            w.write(step, {"loss": loss, "lr": 1e-3 * (step + 1)})
        w.write(2, {"loss": 1.75}, prefix="eval")


def _wandb_inspect(path, *args):
    """`wandb leet inspect --json`: W&B's own reader of a .wandb transaction log (offline)."""
    return subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *args,
                           str(path)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120, check=True).stdout


def test_wandb_offline_run_reads_back(offline):
    workdir = offline / "myrun"
    _write_run(workdir, wandb=True, wandb_project="ftjax-test")
    runs = list((workdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    files = list(runs[0].glob("*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    records = [json.loads(line) for line in _wandb_inspect(files[0]).splitlines()]
    items = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [(h["_step"], h["train/loss"]) for h in items] == list(LOSSES.items())
    assert [h["train/lr"] for h in items] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert items[-1]["eval/loss"] == 1.75 and all("eval/loss" not in h for h in items[:-1])
    summary = json.loads(_wandb_inspect(files[0], "--summary"))
    assert summary["state"] == "finished" and summary["exit_code"] == 0
    assert summary["name"] == "myrun" and summary["project"] == "ftjax-test"
    assert summary["summary"]["train/loss"] == LOSSES[2]
    assert summary["config"]["train"]["steps"] == 3
    assert summary["config"]["train"]["patterns"] == ["a", "b"]


def test_mlflow_file_store_reads_back(offline):
    workdir = offline / "myrun"
    _write_run(workdir, mlflow=True)
    assert os.environ.get("MLFLOW_ALLOW_FILE_STORE") == "true"  # MLflow 3 asks for the opt-in
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=(workdir / "mlruns").as_uri())
    exp = client.get_experiment_by_name("ftjax")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "myrun" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == list(LOSSES.items())
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                 "eval/loss")] == [(2, 1.75)]
    params = run.data.params
    assert params["train.steps"] == "3" and params["trainer"] == "sft"
    assert params["train.patterns"] == '["a", "b"]'
    assert params["optimizer.learning_rate"] == "0.001"
    assert params["note"] == "x" * 6000  # cut to MLflow's limit on a param value


def test_mlflow_uri_setting_and_experiment(offline):
    store = offline / "elsewhere"
    _write_run(offline / "wd", mlflow=True, mlflow_uri=str(store), mlflow_experiment="exp1")
    assert not (offline / "wd" / "mlruns").exists()
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("exp1").experiment_id])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] == \
        list(LOSSES.values())


def test_off_by_default(tmp_path, monkeypatch):
    # Nothing is imported either: a default writer works without the libraries.
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with monitor.MetricWriter(tmp_path) as w:
        w.write(1, {"loss": 1.0})
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "tb"]
    assert loop.DEFAULTS["wandb"] is False and loop.DEFAULTS["mlflow"] is False
    assert {k: loop.DEFAULTS[k] for k in tracking.DEFAULTS} == tracking.DEFAULTS


def test_config_checks():
    from ftjax.trainers._validate import rule_problem
    assert rule_problem("shared", loop.CHECKS["wandb_mode"])
    assert rule_problem("yes", loop.CHECKS["mlflow"]) and rule_problem(2, loop.CHECKS["wandb"])
    assert rule_problem("offline", loop.CHECKS["wandb_mode"]) is None
    with pytest.raises(ValueError, match="wandb_mode='shared' is not supported"):
        tracking.resolve_settings({"wandb": True, "wandb_mode": "shared"})
    with pytest.raises(ValueError, match="unknown tracking setting"):
        tracking.resolve_settings({"wandb_projekt": "x"})


@pytest.mark.parametrize("module,setting,pip", [("wandb", "wandb", "pip install wandb"),
                                                ("mlflow", "mlflow", "pip install mlflow-skinny")])
def test_missing_library_says_what_to_install(tmp_path, monkeypatch, module, setting, pip):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
    for primary in (True, False):  # every process refuses alike
        with pytest.raises(ImportError, match=pip):
            tracking.Trackers(tmp_path, {setting: True}, primary=primary)
    with pytest.raises(ImportError, match=f"train.{setting}=True needs"):
        monitor.MetricWriter(tmp_path / "wd", tracking={setting: True})
    assert not (tmp_path / "wd").exists()


def test_remote_workdir_refused_unless_pointed_elsewhere(tmp_path):
    with pytest.raises(ValueError, match="wandb_dir to a local directory"):
        monitor.MetricWriter("gs://bucket/run", tracking={"wandb": True})
    with pytest.raises(ValueError, match="mlflow_uri to a local directory"):
        monitor.MetricWriter("gs://bucket/run", tracking={"mlflow": True})
    with pytest.raises(ValueError, match="train.wandb_dir='gs://other' is remote"):
        tracking.Trackers(tmp_path, {"wandb": True, "wandb_dir": "gs://other"}, primary=False)
    # Pointed at a local directory / another store, the settings pass (checked, not opened).
    tracking.Trackers("gs://bucket/run", {"wandb": True, "wandb_dir": str(tmp_path),
                                          "mlflow": True, "mlflow_uri": "sqlite:///x.db"},
                      primary=False)
    assert tracking._wandb_dir("gs://bucket/run", str(tmp_path)) == str(tmp_path)
    assert tracking._mlflow_uri("gs://bucket/run", str(tmp_path / "ml")) == \
        (tmp_path / "ml").as_uri()
    assert os.listdir(tmp_path) == []


def test_flatten_config():
    cfg = ml_collections.ConfigDict({"a": {"b": 1, "c": (1, 2), "d": {}}, "e": None, "f": True})
    assert tracking.flatten_config(cfg) == {"a.b": "1", "a.c": "[1, 2]", "a.d": "{}",
                                            "e": "None", "f": "True"}
