"""The same runs on a cluster: a SLURM job array, or a launch list for TPU VMs.

    python -m ftjax.sweep slurm experiments/lora_rank_alpha/sweep.py [--stage final]
        -> <dir>/slurm/runs.txt (one line per run: index, name, hash) and <dir>/slurm/sweep.sbatch,
           an array job whose task i runs `python -m ftjax.sweep run-one SWEEP --index i`:
           the same skip / resume / record logic as the local runner.
    python -m ftjax.sweep tpu experiments/... --tpu NAME --zone ZONE
        -> <dir>/tpu/launch.sh: one `scripts/launch_tpu.sh NAME ZONE CONFIG WORKDIR OVERRIDES`
           line per run not yet finished (a pod runs one run at a time, on all its workers).

Both list the runs of `spec.load` (or the final stage) in the same order with the same
names, workdirs and config hashes as `python -m ftjax.sweep run`.
"""
from __future__ import annotations

import os
import shlex
from typing import Sequence

from ftjax import workdir as workdir_lib
from ftjax.sweep import runner
from ftjax.sweep import spec as spec_lib

__all__ = ["write_slurm", "write_tpu"]


def _runs_table(sweep, runs, extra) -> str:
    lines = ["# index name config_hash workdir"]
    for i, r in enumerate(runs):
        lines.append(f"{i} {r.name} {runner.run_hash(sweep, r, extra)} "
                     f"{runner.workdir_of(sweep, r)}")
    return "\n".join(lines) + "\n"


def write_slurm(sweep: spec_lib.Sweep, runs: Sequence[spec_lib.Run], *, stage: str = "",
                extra: Sequence[str] = (), max_parallel: int = 0,
                sbatch_lines: Sequence[str] = (), python: str = "python") -> str:
    """Writes `<dir>/slurm/{runs.txt,sweep.sbatch}`; returns the sbatch path."""
    if not runs:
        raise ValueError("no runs to launch")
    out = workdir_lib.mkdir(str(sweep.config.dir), "slurm")
    (out / "runs.txt").write_text(_runs_table(sweep, runs, extra))
    array = f"0-{len(runs) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    stage_arg = f" --stage {stage}" if stage else ""
    root = spec_lib._root()  # pylint: disable=protected-access
    logs = os.path.join(str(sweep.config.dir), "slurm", "logs")
    body = [
        "#!/usr/bin/env bash",
        f"# Sweep {sweep.name}: {len(runs)} runs, one per array task "
        f"(listed in runs.txt). Written by python -m ftjax.sweep slurm.",
        f"#SBATCH --job-name=ftjax-{sweep.name}",
        f"#SBATCH --array={array}",
        f"#SBATCH --output={logs}/%A_%a.out",
        "#SBATCH --requeue",
        *[f"#SBATCH {line}" for line in sbatch_lines],
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(logs)}",
        f"cd {shlex.quote(root)}",
        f"exec {python} -m ftjax.sweep run-one {shlex.quote(sweep.path)} "
        f"--dir {shlex.quote(str(sweep.config.dir))}{stage_arg} --index \"$SLURM_ARRAY_TASK_ID\"",
    ]
    path = out / "sweep.sbatch"
    path.write_text("\n".join(body) + "\n")
    return str(path)


def write_tpu(sweep: spec_lib.Sweep, runs: Sequence[spec_lib.Run], *, tpu: str, zone: str,
              extra: Sequence[str] = ()) -> tuple[str, int]:
    """Writes `<dir>/tpu/launch.sh` with one launch_tpu.sh line per unfinished run; returns
    (path, number of lines)."""
    if not tpu or not zone:
        raise ValueError("the TPU launch list needs --tpu NAME and --zone ZONE")
    out = workdir_lib.mkdir(str(sweep.config.dir), "tpu")
    lines = ["#!/usr/bin/env bash",
             f"# Sweep {sweep.name}: runs not finished when this list was written "
             "(python -m ftjax.sweep tpu). Each line runs on all workers of the TPU VM.",
             "set -euo pipefail", 'cd "$(git rev-parse --show-toplevel)"']
    n = 0
    for r in runs:
        wd = runner.workdir_of(sweep, r)
        h = runner.run_hash(sweep, r, extra)
        if runner.run_state(wd, h) == "finished":
            continue
        args = [r.config_spec(str(sweep.config.base)), wd] + r.overrides(tuple(sweep.config.overrides)
                                                          + tuple(extra))
        lines.append(f"# {r.name} (config hash {h})")
        lines.append(" ".join(["scripts/launch_tpu.sh", shlex.quote(tpu), shlex.quote(zone)]
                              + [shlex.quote(a) for a in args]))
        n += 1
    path = out / "launch.sh"
    path.write_text("\n".join(lines) + "\n")
    return str(path), n
