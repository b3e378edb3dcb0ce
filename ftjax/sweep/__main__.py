"""`python -m ftjax.sweep COMMAND SWEEP [options]`: run, launch and analyse a sweep.

    list      the runs (name, stage, config hash, state) without running anything
    run       every run not finished yet, here (`--procs N`: N at a time); a `select` sweep
              then runs its final stage, a `search` sweep searches and then runs its final
              stage; ends with `analyze` (unless --no-analyze)
    run-one   run number `--index I` of a stage (what each SLURM array task runs)
    slurm     write a SLURM job array for a stage (<dir>/slurm/sweep.sbatch)
    tpu       write a TPU-VM launch list for a stage (<dir>/tpu/launch.sh)
    analyze   results.md, results.json and plots from the workdirs into the sweep's folder

SWEEP is a sweep file (or its folder): see ftjax/sweep/spec.py and docs/sweeps.md.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from ftjax.sweep import spec as spec_lib


def _stage_runs(sweep, stage: str):
    """(runs, extra overrides) of a stage: "" / "select" / "search" / "final"."""
    from ftjax.sweep import collect, protocol, search  # pylint: disable=import-outside-toplevel
    has_select = "select" in sweep.config
    has_search = "search" in sweep.config
    if stage in ("", "select") and not has_search:
        return sweep.runs, ()
    if stage == "search":
        if not has_search:
            raise ValueError(f"{sweep.path} has no search section")
        return search.trial_runs(sweep, search.recorded_trials(sweep)), ()
    if stage == "final":
        if has_select:
            sec = protocol.select_section(sweep)
            rows = collect.collect(sweep, sweep.runs)
            chosen = protocol.choose(rows, sec["objective"], sec["direction"], sec["group_by"],
                                     sec["tiebreak"], sec["tiebreak_direction"])
            return protocol.final_runs(sweep, chosen, sec["seeds"]), tuple(sec["overrides"])
        if has_search:
            sec = search.search_section(sweep)
            if not sec["final_seeds"]:
                raise ValueError("search.final_seeds is empty: there is no final stage")
            best = search.best_trial(search.recorded_trials(sweep), sec["direction"])
            base = {k: v for k, v in best["values"].items() if k != sweep.config.seed_key}
            return (protocol.final_runs(sweep, [{"params": base}], sec["final_seeds"]),
                    tuple(sec["final_overrides"]))
        raise ValueError(f"{sweep.path} has neither select nor search: no final stage")
    raise ValueError(f"unknown stage {stage!r} for {sweep.path}")


def _filter(runs, only: str):
    if not only:
        return list(runs)
    pat = re.compile(only)
    return [r for r in runs if pat.search(r.name)]


def cmd_list(sweep, args) -> int:
    from ftjax.sweep import runner  # pylint: disable=import-outside-toplevel
    stages = [args.stage] if args.stage else (
        ["search"] if "search" in sweep.config else ["select" if "select" in sweep.config
                                                     else ""])
    for stage in stages:
        runs, extra = _stage_runs(sweep, stage)
        for i, r in enumerate(_filter(runs, args.only)):
            h = runner.run_hash(sweep, r, extra)
            state = runner.run_state(runner.workdir_of(sweep, r), h)
            print(f"{i:4d} {r.stage or '-':7s} {h} {state:11s} {r.name}")
    return 0


def cmd_run(sweep, args) -> int:
    from ftjax.sweep import runner  # pylint: disable=import-outside-toplevel
    failed = 0
    if "search" in sweep.config:
        from ftjax.sweep import search  # pylint: disable=import-outside-toplevel
        trials = search.run_search(sweep, procs=args.procs)
        failed += sum(1 for t in trials if t["status"] == "failed")
        if search.search_section(sweep)["final_seeds"]:
            runs, extra = _stage_runs(sweep, "final")
            outs = runner.run_all(sweep, _filter(runs, args.only), procs=args.procs,
                                  extra=extra, force=args.force)
            failed += sum(1 for o in outs if o.status == "failed")
    else:
        outs = runner.run_all(sweep, _filter(sweep.runs, args.only), procs=args.procs,
                              force=args.force)
        failed += sum(1 for o in outs if o.status == "failed")
        if "select" in sweep.config and not failed:
            runs, extra = _stage_runs(sweep, "final")
            print(f"[sweep {sweep.name}] final stage: {len(runs)} runs of the values chosen on "
                  "the validation split")
            outs = runner.run_all(sweep, runs, procs=args.procs, extra=extra, force=args.force)
            failed += sum(1 for o in outs if o.status == "failed")
    if not args.no_analyze:
        cmd_analyze(sweep, args)
    if failed:
        print(f"[sweep {sweep.name}] {failed} run(s) failed; run the same command again to "
              "retry them (finished runs are skipped)", file=sys.stderr)
    return 1 if failed else 0


def cmd_run_one(sweep, args) -> int:
    from ftjax.sweep import runner  # pylint: disable=import-outside-toplevel
    runs, extra = _stage_runs(sweep, args.stage or ("select" if "select" in sweep.config else ""))
    if not 0 <= args.index < len(runs):
        raise SystemExit(f"--index {args.index} is outside 0..{len(runs) - 1} "
                         f"({len(runs)} runs in this stage)")
    out = runner.run_one(sweep, runs[args.index], extra=extra, force=args.force)
    print(f"[sweep {sweep.name}] {out.name}: {out.status} {out.message}")
    return 0 if out.status in ("finished", "skipped", "pruned") else 1


def cmd_slurm(sweep, args) -> int:
    from ftjax.sweep import launch  # pylint: disable=import-outside-toplevel
    stage = args.stage or ("select" if "select" in sweep.config else "")
    runs, extra = _stage_runs(sweep, stage)
    path = launch.write_slurm(sweep, runs, stage=stage, extra=extra,
                              max_parallel=args.max_parallel, sbatch_lines=args.sbatch)
    print(f"wrote {path} ({len(runs)} array tasks); submit with: sbatch {path}")
    return 0


def cmd_tpu(sweep, args) -> int:
    from ftjax.sweep import launch  # pylint: disable=import-outside-toplevel
    stage = args.stage or ("select" if "select" in sweep.config else "")
    runs, extra = _stage_runs(sweep, stage)
    path, n = launch.write_tpu(sweep, runs, tpu=args.tpu, zone=args.zone, extra=extra)
    print(f"wrote {path} ({n} unfinished runs); run it with: bash {path}")
    return 0


def cmd_analyze(sweep, args) -> int:
    from ftjax.sweep import report  # pylint: disable=import-outside-toplevel
    paths = report.write(sweep, _stage_runs, out=args.out or None)
    for p in paths:
        print(f"wrote {p}")
    return 0


COMMANDS = {"list": cmd_list, "run": cmd_run, "run-one": cmd_run_one, "slurm": cmd_slurm,
            "tpu": cmd_tpu, "analyze": cmd_analyze}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ftjax.sweep",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("command", choices=sorted(COMMANDS))
    ap.add_argument("sweep", help="a sweep file, or the folder holding its sweep.py")
    ap.add_argument("--dir", default="", help="where the runs live (default: the config's "
                                              "dir, else workdirs/sweeps/<name>)")
    ap.add_argument("--out", default="", help="analyze: where results go (default: the "
                                              "sweep file's folder)")
    ap.add_argument("--procs", type=int, default=1, help="runs at a time on this machine")
    ap.add_argument("--only", default="", help="only runs whose name matches this regex")
    ap.add_argument("--stage", default="", choices=["", "select", "search", "final"])
    ap.add_argument("--index", type=int, default=-1, help="run-one: the run's index")
    ap.add_argument("--force", action="store_true", help="re-run finished runs too")
    ap.add_argument("--no-analyze", action="store_true")
    ap.add_argument("--max-parallel", type=int, default=0, help="slurm: array %%limit")
    ap.add_argument("--sbatch", action="append", default=[],
                    help="slurm: an extra #SBATCH line, e.g. --sbatch=--gpus=1 (repeatable)")
    ap.add_argument("--tpu", default="")
    ap.add_argument("--zone", default="")
    args = ap.parse_args(argv)
    try:
        sweep = spec_lib.load(args.sweep)
        if args.dir:
            sweep.config.dir = args.dir if "://" in args.dir else os.path.abspath(args.dir)
        return COMMANDS[args.command](sweep, args)
    except (ValueError, FileNotFoundError, TypeError, ImportError) as e:
        print(f"ftjax.sweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
