"""Running a sweep's runs: one process per run, skipped when finished, resumed when not.

Each run is `python -m ftjax.main --config BASE --workdir <dir>/runs/[<stage>/]<name>
--config.k=v ...` in a subprocess (its output in `<workdir>.log`). Before starting, the
runner computes the run's config hash exactly as `ftjax.main` will (`main.resolved_config`)
and reads the workdir's run record (`run.json`, ftjax/run_record.py):

    finished with this hash  -> skipped
    another hash in config.json (the sweep file changed)  -> the old workdir is moved to
                                <dir>/stale/<name>.<oldhash> and the run starts afresh
    pruned (pruned.json)     -> skipped (a search decided it)
    anything else            -> run; an interrupted run resumes from its last checkpoint

A `pruner(step, value) -> bool` can watch one metrics.jsonl column while the run trains and
stop it (SIGINT, so the run record says "interrupted" and pruned.json says why).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Sequence

from ftjax import run_record
from ftjax import workdir as workdir_lib
from ftjax.sweep import spec as spec_lib

__all__ = ["Outcome", "workdir_of", "command", "run_hash", "run_state", "run_one", "run_all",
           "PRUNED", "Pruner"]

PRUNED = "pruned.json"
Pruner = Callable[[int, float], bool]


@dataclasses.dataclass
class Outcome:
    name: str
    status: str                 # finished | skipped | failed | pruned
    config_hash: str
    workdir: str
    wall_s: float = 0.0
    returncode: Optional[int] = None
    message: str = ""


def workdir_of(sweep: spec_lib.Sweep, run: spec_lib.Run) -> str:
    parts = [str(sweep.config.dir), "runs"] + ([run.stage] if run.stage else []) + [run.name]
    return "/".join(p.rstrip("/") for p in parts) if workdir_lib.is_remote(parts[0]) \
        else os.path.join(*parts)


def run_args(sweep: spec_lib.Sweep, run: spec_lib.Run, extra: Sequence[str] = ()) -> list[str]:
    """The `ftjax` arguments of a run (after `python -m ftjax.main`)."""
    return (["--config", run.config_spec(str(sweep.config.base)),
             "--workdir", workdir_of(sweep, run)]
            + run.overrides(tuple(sweep.config.overrides) + tuple(extra)))


def command(sweep: spec_lib.Sweep, run: spec_lib.Run, extra: Sequence[str] = (),
            python: str = "") -> list[str]:
    return [python or sys.executable, "-m", "ftjax.main"] + run_args(sweep, run, extra)


_HASHES: dict[tuple, str] = {}


def run_hash(sweep: spec_lib.Sweep, run: spec_lib.Run, extra: Sequence[str] = ()) -> str:
    """The config hash `ftjax.main` records for this run (same resolution, same hash)."""
    from ftjax import config_record, config_utils  # pylint: disable=import-outside-toplevel
    from ftjax.main import resolved_config  # pylint: disable=import-outside-toplevel
    args = run_args(sweep, run, extra)
    key = tuple(args)
    if key not in _HASHES:
        spec, _, overrides, _ = config_utils.parse_cli(args)
        try:
            cfg = resolved_config(spec, overrides)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"sweep {sweep.name}, run {run.name}: its config is refused: "
                             f"{e}") from None
        _HASHES[key] = config_record.config_hash(cfg)
    return _HASHES[key]


def _stored_hash(workdir: str) -> Optional[str]:
    try:
        if workdir_lib.exists(workdir, "config.json"):
            return workdir_lib.read_json(workdir, "config.json").get("_hash")
    except (ValueError, OSError):
        return "unreadable"
    return None


def run_state(workdir: str, config_hash: str) -> str:
    """new | finished | pruned | stale | interrupted | failed, from the workdir's files."""
    if not workdir_lib.exists(workdir):
        return "new"
    stored = _stored_hash(workdir)
    if stored is not None and stored != config_hash:
        return "stale"
    if workdir_lib.exists(workdir, PRUNED):
        return "pruned"
    rec = run_record.read(workdir)
    if rec is None:
        return "new" if stored is None else "interrupted"
    if rec.get("config_hash") != config_hash:
        return "stale"
    status = rec.get("status")
    if status == "finished":
        return "finished"
    return "failed" if status == "failed" else "interrupted"


def _move_stale(sweep: spec_lib.Sweep, workdir: str, name: str) -> str:
    old = _stored_hash(workdir) or "unknown"
    dest = workdir_lib.path(str(sweep.config.dir), "stale", f"{name}.{old}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        dest = workdir_lib.path(str(dest) + f".{int(time.time())}")
    workdir_lib.path(workdir).rename(dest)
    return str(dest)


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, so the run's Python turns it
    into KeyboardInterrupt (and records "interrupted") even when the runner itself was
    started with SIGINT ignored (a background job, a pytest-xdist worker)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _watch(workdir: str, metrics_file: str, split: str, key: str, pruner: Pruner,
           proc: subprocess.Popen, verdict: dict, stop: threading.Event, poll_s: float) -> None:
    """Reads new `metrics.jsonl` rows of `split` with `key` and asks `pruner` about each."""
    seen = 0
    while not stop.wait(poll_s):
        try:
            text = workdir_lib.read_text(workdir, metrics_file)
        except (FileNotFoundError, OSError):
            continue
        lines = text.splitlines()
        complete = lines if text.endswith("\n") else lines[:-1]
        for line in complete[seen:]:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("split") != split or key not in row:
                continue
            value = float(row[key])
            step = int(row["step"])
            if pruner(step, value):
                verdict.update(step=step, value=value, split=split, key=key)
                try:
                    proc.send_signal(signal.SIGINT)
                except ProcessLookupError:
                    pass
                return
        seen = len(complete)


def run_one(sweep: spec_lib.Sweep, run: spec_lib.Run, *, extra: Sequence[str] = (),
            pruner: Optional[Pruner] = None, prune_metric: str = "", force: bool = False,
            poll_s: float = 1.0, quiet: bool = False, env: Optional[dict] = None) -> Outcome:
    """Runs (or skips) one run of `sweep`; `prune_metric` is "<split>/<key>" of metrics.jsonl."""
    wd = workdir_of(sweep, run)
    h = run_hash(sweep, run, extra)
    state = run_state(wd, h)
    if state == "finished" and not force:
        return Outcome(run.name, "skipped", h, wd, message="finished earlier")
    if state == "pruned" and not force:
        return Outcome(run.name, "pruned", h, wd, message="pruned earlier")
    if state == "stale":
        moved = _move_stale(sweep, wd, run.name)
        if not quiet:
            print(f"[sweep] {run.name}: the workdir holds another config; moved to {moved}")
    cmd = command(sweep, run, extra)
    remote = workdir_lib.is_remote(wd)
    log_path = (os.path.join(os.getcwd(), "sweep_logs", f"{run.name}.log") if remote
                else wd + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t0 = time.time()
    verdict: dict = {}
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                cwd=spec_lib._root(), env=env,  # pylint: disable=protected-access
                                preexec_fn=_default_sigint)
        stop = threading.Event()
        watcher = None
        if pruner is not None and prune_metric:
            split, _, key = prune_metric.rpartition("/")
            watcher = threading.Thread(target=_watch, args=(
                wd, str(sweep.config.metrics_file), split, key, pruner, proc, verdict, stop,
                poll_s), daemon=True)
            watcher.start()
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            proc.wait()
            raise
        finally:
            stop.set()
            if watcher is not None:
                watcher.join()
    wall = time.time() - t0
    if verdict:
        workdir_lib.write_json(wd, PRUNED, {**verdict, "config_hash": h})
        return Outcome(run.name, "pruned", h, wd, wall, rc,
                       f"pruned at step {verdict['step']} ({prune_metric}={verdict['value']:.4g})")
    if rc != 0:
        tail = open(log_path, encoding="utf-8", errors="replace").read()[-1500:]
        return Outcome(run.name, "failed", h, wd, wall, rc,
                       f"exit code {rc}; log {log_path}:\n{tail}")
    return Outcome(run.name, "finished", h, wd, wall, rc)


def run_all(sweep: spec_lib.Sweep, runs: Sequence[spec_lib.Run], *, procs: int = 1,
            extra: Sequence[str] = (), force: bool = False, quiet: bool = False,
            env: Optional[dict] = None) -> list[Outcome]:
    """Runs `runs` in order, `procs` at a time; prints a line per run; never stops at a
    failure (the failed ones are listed at the end and run again next time)."""
    if procs < 1:
        raise ValueError(f"--procs must be >= 1, got {procs}")
    for r in runs:  # every config is checked before any run starts
        run_hash(sweep, r, extra)
    n = len(runs)
    done = [0]
    lock = threading.Lock()

    def one(run: spec_lib.Run) -> Outcome:
        out = run_one(sweep, run, extra=extra, force=force, quiet=quiet, env=env)
        with lock:
            done[0] += 1
            if not quiet:
                extra_msg = f" ({out.message.splitlines()[0]})" if out.message else ""
                print(f"[sweep {sweep.name}] {done[0]}/{n} {run.name}: {out.status}"
                      f"{'' if out.status == 'skipped' else f' in {out.wall_s:.0f}s'}"
                      f"{extra_msg}", flush=True)
        return out

    if procs == 1:
        outs = [one(r) for r in runs]
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=procs) as pool:
            outs = list(pool.map(one, runs))
    failed = [o for o in outs if o.status == "failed"]
    if failed and not quiet:
        for o in failed:
            print(f"[sweep {sweep.name}] FAILED {o.name}: {o.message}", file=sys.stderr)
    return outs
