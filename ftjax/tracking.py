"""Optional experiment trackers beside metrics.jsonl and TensorBoard: Weights & Biases and MLflow.

Both are off by default (`train.wandb`, `train.mlflow`; docs/monitoring.md, "Tracking") and
are fed by `monitor.MetricWriter` on process 0 only. Each writer has the same small protocol:

    write_scalars(step, {"train/loss": 1.23, ...})   # names "{prefix}/{name}", as in TensorBoard
    log_config(resolved_config)                      # once, right after opening
    close()

W&B runs offline by default: the run is written to `<dir>/wandb/offline-run-*` and uploaded
later with `wandb sync`. MLflow writes to a file store in `<workdir>/mlruns` by default (or to
any tracking URI). Neither writes to an object store: a `gs://` workdir needs `train.wandb_dir`
/ `train.mlflow_uri` pointing elsewhere. The libraries are imported only when enabled.
"""
from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import time
from collections.abc import Mapping
from typing import Any

from ftjax import workdir as workdir_lib

__all__ = ["DEFAULTS", "WANDB_MODES", "WandbWriter", "MlflowWriter", "Trackers",
           "flatten_config", "resolve_settings"]

# The tracker settings, as they sit in the `train` section (train/loop.py:DEFAULTS repeats them).
DEFAULTS = dict(
    wandb=False,
    wandb_project="ftjax",
    wandb_mode="offline",   # "offline", "disabled", or "online" (set explicitly; needs a login)
    wandb_dir="",           # local directory for the W&B run files; "" = the workdir
    mlflow=False,
    mlflow_uri="",          # tracking URI or local path; "" = file store <workdir>/mlruns
    mlflow_experiment="ftjax",
)
WANDB_MODES = ("offline", "disabled", "online")
_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # what MLflow accepts in metric and param names


def resolve_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """`DEFAULTS` updated with `settings`; unknown keys and W&B modes are refused."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown tracking setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **settings}
    if out["wandb"] and out["wandb_mode"] not in WANDB_MODES:
        raise ValueError(f"train.wandb_mode={out['wandb_mode']!r} is not supported: use "
                         "'offline' (the default; upload later with `wandb sync`), 'disabled', "
                         "or set 'online' explicitly")
    return out


def _require(module: str, pip: str, setting: str) -> Any:
    """Imports `module` or says which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{setting}=True needs the `{module}` package, which is not "
                          f"installed: pip install {pip} (or pip install 'ftjax[tracking]'), "
                          f"or set --config.{setting}=False") from e


def _run_name(workdir: str | os.PathLike[str]) -> str:
    return os.path.basename(os.fspath(workdir).rstrip("/")) or "ftjax"


def _wandb_dir(workdir: str | os.PathLike[str], wandb_dir: str = "") -> str:
    """The local directory W&B writes its run under (`<dir>/wandb/...`)."""
    target = os.fspath(wandb_dir or workdir)
    if workdir_lib.is_remote(target):
        where = f"train.wandb_dir={target!r}" if wandb_dir else f"the workdir {target!r}"
        raise ValueError(f"train.wandb writes its run files to a local directory, and {where} "
                         "is remote: set --config.train.wandb_dir to a local directory (and "
                         "upload the offline run later with `wandb sync`)")
    return os.path.abspath(os.path.expanduser(target))


def _mlflow_uri(workdir: str | os.PathLike[str], uri: str = "") -> str:
    """The MLflow tracking URI: `uri` (a plain path becomes a file URI), else the file store
    `<workdir>/mlruns` as an absolute `file:` URI."""
    if uri:
        if ":" in uri:  # file:/..., sqlite:///..., http(s)://..., databricks
            return uri
        return pathlib.Path(os.path.abspath(os.path.expanduser(uri))).as_uri()
    if workdir_lib.is_remote(workdir):
        raise ValueError(f"train.mlflow keeps its file store in the workdir, and the workdir "
                         f"{os.fspath(workdir)!r} is remote: set --config.train.mlflow_uri to a "
                         "local directory, a database (sqlite:///...) or a tracking server "
                         "(http://...)")
    local = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
    return (pathlib.Path(local) / "mlruns").as_uri()


def _plain(obj: Any) -> Any:
    """A config (ConfigDict, dict, lists) as nested dicts/lists of JSON scalars."""
    if hasattr(obj, "to_dict") and not isinstance(obj, type):
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def flatten_config(cfg: Any) -> dict[str, str]:
    """{"train.steps": "100", ...}: a config's leaves under dotted keys, values as strings
    (lists as JSON)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        elif prefix:
            out[prefix] = node if isinstance(node, str) else (
                json.dumps(node) if isinstance(node, (list, dict)) else str(node))

    walk(_plain(cfg), "")
    return out


class WandbWriter:
    """A W&B run, offline by default: `<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb`.

    `dir` defaults to the workdir; the run's name is the workdir's base name. Upload an
    offline run with `wandb sync <dir>/wandb/offline-run-*`.
    """

    def __init__(self, workdir: str | os.PathLike[str], *, project: str = "ftjax",
                 mode: str = "offline", dir: str = "", name: str = "") -> None:  # noqa: A002
        resolve_settings({"wandb": True, "wandb_mode": mode})
        self.dir = _wandb_dir(workdir, dir)
        wandb = _require("wandb", "wandb", "train.wandb")
        os.makedirs(self.dir, exist_ok=True)
        # create_new: one process may hold several runs (tests, sweeps); each is finished here.
        self.run = wandb.init(mode=mode, dir=self.dir, project=project,
                              name=name or _run_name(workdir), reinit="create_new")

    def log_config(self, cfg: Any) -> None:
        self.run.config.update(_plain(cfg), allow_val_change=True)

    def write_scalars(self, step: int, values: Mapping[str, float]) -> None:
        if values:
            self.run.log({k: float(v) for k, v in values.items()}, step=int(step))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MlflowWriter:
    """An MLflow run through `mlflow.MlflowClient(tracking_uri)` (no global MLflow state).

    The tracking URI defaults to the file store `<workdir>/mlruns`; the experiment is created
    when missing; the run is named after the workdir. The config goes in as params (dotted
    keys, string values cut to MLflow's length limits), the scalars as metrics with their step.
    MLflow 3 refuses file stores unless `MLFLOW_ALLOW_FILE_STORE` is set: for a `file:` URI it
    is set to true in this process unless already set.
    """

    def __init__(self, workdir: str | os.PathLike[str], *, uri: str = "",
                 experiment: str = "ftjax", name: str = "") -> None:
        self.uri = _mlflow_uri(workdir, uri)
        mlflow = _require("mlflow", "mlflow-skinny", "train.mlflow")
        from mlflow.entities import Metric, Param  # pylint: disable=import-outside-toplevel
        self._metric, self._param = Metric, Param
        try:
            from mlflow.utils import validation as v  # pylint: disable=import-outside-toplevel
            self._limits = (v.MAX_ENTITY_KEY_LENGTH, v.MAX_PARAM_VAL_LENGTH,
                            v.MAX_PARAMS_TAGS_PER_BATCH, v.MAX_METRICS_PER_BATCH)
        except (ImportError, AttributeError):
            self._limits = (250, 6000, 100, 1000)
        if self.uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                exp_id = self.client.create_experiment(experiment)
            except mlflow.exceptions.MlflowException:  # created meanwhile by another run
                exp_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            exp_id = exp.experiment_id
        self.run_id: str | None = self.client.create_run(
            exp_id, run_name=name or _run_name(workdir)).info.run_id

    def _key(self, name: str) -> str:
        return _KEY_CHARS.sub("_", name)[: self._limits[0]]

    def log_config(self, cfg: Any) -> None:
        params: dict[str, str] = {}
        for k, v in flatten_config(cfg).items():
            params.setdefault(self._key(k), v[: self._limits[1]])
        items = [self._param(k, v) for k, v in params.items()]
        for i in range(0, len(items), self._limits[2]):
            self.client.log_batch(self.run_id, params=items[i: i + self._limits[2]])

    def write_scalars(self, step: int, values: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        items = [self._metric(self._key(k), float(v), now, int(step)) for k, v in values.items()]
        for i in range(0, len(items), self._limits[3]):
            self.client.log_batch(self.run_id, metrics=items[i: i + self._limits[3]])

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)
            self.run_id = None


class Trackers:
    """The trackers `settings` (keys of `DEFAULTS`) turn on, as one writer.

    The settings, the library imports and the local directories are checked on every process
    (a misconfigured run fails everywhere alike); runs are opened only where `primary`.
    `config`, when given, is logged once (W&B config, MLflow params).
    """

    def __init__(self, workdir: str | os.PathLike[str],
                 settings: Mapping[str, Any] | None = None, config: Any = None, *,
                 primary: bool = True) -> None:
        s = resolve_settings(settings)
        self.writers: list[Any] = []
        if s["wandb"]:
            _wandb_dir(workdir, s["wandb_dir"])
            _require("wandb", "wandb", "train.wandb")
        if s["mlflow"]:
            _mlflow_uri(workdir, s["mlflow_uri"])
            _require("mlflow", "mlflow-skinny", "train.mlflow")
        if not primary:
            return
        try:
            if s["wandb"]:
                self.writers.append(WandbWriter(workdir, project=s["wandb_project"],
                                                mode=s["wandb_mode"], dir=s["wandb_dir"]))
            if s["mlflow"]:
                self.writers.append(MlflowWriter(workdir, uri=s["mlflow_uri"],
                                                 experiment=s["mlflow_experiment"]))
            if config is not None:
                self.log_config(config)
        except BaseException:
            self.close()
            raise

    def __bool__(self) -> bool:
        return bool(self.writers)

    def log_config(self, cfg: Any) -> None:
        for w in self.writers:
            w.log_config(cfg)

    def write_scalars(self, step: int, values: Mapping[str, float]) -> None:
        for w in self.writers:
            w.write_scalars(step, values)

    def close(self) -> None:
        writers, self.writers = self.writers, []
        for w in writers:
            w.close()
