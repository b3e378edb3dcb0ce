"""The record of a run: `<workdir>/run.json`, written by every `ftjax` run.

It pins a result to what made it: the config hash, the code (git commit, whether the tree was
dirty and which files), the package versions, the devices, every seed in the config, and per
attempt (a resumed run adds one) the wall and CPU time and how it ended. Sweeps read it to
skip finished runs and to report; nothing is retyped by hand.

    {"config_hash": "3f2a...", "status": "finished",
     "code": {"git_commit": "750dcc6...", "git_dirty": false, "dirty_files": [], ...},
     "packages": {"jax": "0.10.2", ...}, "devices": {"kind": "cpu", "count": 8, ...},
     "seeds": {"seed": 0, "data.seed": 0}, "attempts": [{"started": ..., "wall_s": ...}]}

Only process 0 writes. CPU time is process 0's (user + system, its children included).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from typing import Any, Mapping, Optional

from ftjax import paths
from ftjax import workdir as workdir_lib

__all__ = ["RECORD", "code_state", "package_versions", "device_info", "config_seeds",
           "RunRecord", "read"]

RECORD = "run.json"
PACKAGES = ("ftjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
            "ml-collections", "grain", "tensorflow-datasets", "tokenizers", "safetensors",
            "transformers", "torch", "optuna")
MAX_DIRTY_FILES = 50


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _git(root: str, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def code_state(root: Optional[str] = None) -> dict[str, Any]:
    """The git commit of the ftjax checkout and whether tracked files differ from it.

    Outside a git checkout (a wheel install) the commit is None and the ftjax version is the
    pin. `dirty_files` lists changed tracked files (untracked ones are counted apart: they
    change a result only if something imports or reads them).
    """
    try:
        root = root or paths.root()
    except FileNotFoundError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"root": root, "git_commit": None, "git_dirty": None, "dirty_files": [],
                "untracked_files": None}
    status = _git(root, "status", "--porcelain") or ""
    changed = [line[3:] for line in status.splitlines() if line and not line.startswith("??")]
    untracked = sum(1 for line in status.splitlines() if line.startswith("??"))
    branch = (_git(root, "rev-parse", "--abbrev-ref", "HEAD") or "").strip() or None
    return {"root": root, "git_commit": commit.strip(), "git_branch": branch,
            "git_dirty": bool(changed), "dirty_files": changed[:MAX_DIRTY_FILES],
            "n_dirty_files": len(changed), "untracked_files": untracked}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that decide a result (absent ones left out)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def device_info() -> dict[str, Any]:
    """Backend, device kind and counts (global, local, processes) as JAX sees them."""
    import jax  # pylint: disable=import-outside-toplevel
    devices = jax.devices()
    return {"backend": jax.default_backend(), "kind": devices[0].device_kind,
            "count": len(devices), "local_count": jax.local_device_count(),
            "process_count": jax.process_count(), "host": socket.gethostname(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def config_seeds(cfg: Mapping[str, Any], _prefix: str = "") -> dict[str, Any]:
    """Every config field whose name is or ends in `seed`, by dotted path."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{_prefix}{k}"
        if isinstance(v, Mapping):
            out.update(config_seeds(v, key + "."))
        elif (k == "seed" or k.endswith("_seed")) and (v is None or isinstance(v, int)):
            out[key] = v
    return out


def _cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def read(workdir: str | os.PathLike[str]) -> Optional[dict]:
    """The run record in `workdir`, or None when there is none (or it is unreadable)."""
    try:
        if not workdir_lib.exists(workdir, RECORD):
            return None
        return workdir_lib.read_json(workdir, RECORD)
    except (ValueError, OSError):
        return None


class RunRecord:
    """Opens an attempt in `<workdir>/run.json` (status "running") and closes it with
    `finish(status)`; a resumed run appends an attempt to the same record."""

    def __init__(self, workdir: str | os.PathLike[str], cfg_json: Mapping[str, Any],
                 cfg_hash: str, *, argv: Optional[list[str]] = None, spec: str = ""):
        self.workdir = workdir
        self.enabled = workdir_lib.is_primary()
        self._t0 = time.time()
        self._cpu0 = _cpu_seconds()
        if not self.enabled:
            return
        old = read(workdir) or {}
        attempts = list(old.get("attempts", [])) if old.get("config_hash") == cfg_hash else []
        self.data = {
            "config_hash": cfg_hash,
            "config": spec,
            "status": "running",
            "code": code_state(),
            "packages": package_versions(),
            "devices": device_info(),
            "seeds": config_seeds(cfg_json),
            "trainer": cfg_json.get("trainer", "sft"),
            "attempts": attempts + [{
                "started": _now(), "host": socket.gethostname(), "pid": os.getpid(),
                "argv": list(sys.argv if argv is None else argv), "status": "running"}],
        }
        self._write()

    def _write(self) -> None:
        workdir_lib.write_json(self.workdir, RECORD, self.data)

    def finish(self, status: str = "finished", error: str = "",
               summary: Optional[Mapping[str, Any]] = None) -> None:
        """Closes the attempt: its status, end time, wall and CPU seconds (and the error)."""
        if not self.enabled:
            return
        wall = time.time() - self._t0
        cpu = _cpu_seconds() - self._cpu0
        attempt = self.data["attempts"][-1]
        attempt.update(finished=_now(), status=status, wall_s=round(wall, 2),
                       cpu_s=round(cpu, 2))
        if error:
            attempt["error"] = error[-2000:]
        self.data["status"] = status
        done = [a for a in self.data["attempts"] if "wall_s" in a]
        self.data["wall_s"] = round(sum(a["wall_s"] for a in done), 2)
        self.data["cpu_s"] = round(sum(a["cpu_s"] for a in done), 2)
        if summary is not None:
            self.data["summary_keys"] = sorted(summary)
        self._write()
