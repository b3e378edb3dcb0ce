"""Command-line entry point: `ftjax --config configs/NAME.py[:args] --workdir DIR`
(or `python -m ftjax.main ...`; `--help` lists the flags and the shipped configs).

Overrides: `--config.a.b=value` (typed by the existing field; unknown keys are rejected).
The resolved config is validated (every key's rule, no NaN or infinity), then the mesh, the
batch and the starting weights' headers are checked (seconds, before any data is read); its
hash and the config are written into the workdir (local or `gs://`) by process 0 before
anything runs, with the run record `run.json` (code commit, packages, devices, seeds, wall and
CPU time: `ftjax/run_record.py`); an existing checkpoint in the workdir is resumed. `ftjax` (the console script)
prints any such error as one line (`FTJAX_DEBUG=1`: with its traceback).
"""
from __future__ import annotations

import sys


def resolved_config(spec: str, overrides: list[tuple[str, str]]):
    """The config `ftjax --config SPEC --config.k=v ...` runs: loaded, overridden, every
    trainer default filled and validated. Its `config_record.config_hash` is the run's hash
    (the sweep runner uses this to know a run's hash before starting it)."""
    from ftjax import config_utils
    from ftjax.trainers import resolve_config, validate_config
    cfg = resolve_config(config_utils.load_config(spec), overrides)
    validate_config(cfg)  # impossible or non-finite settings: refused before anything runs
    return cfg


def main(argv: list[str] | None = None) -> dict | None:
    """Runs the experiment that `argv` names and returns the trainer's summary.

    `-h`/`--help` prints the help text and returns None.
    """
    from ftjax import cli as cli_lib
    from ftjax import config_utils, sharding
    argv = sys.argv[1:] if argv is None else argv
    try:
        spec, workdir, overrides, _ = config_utils.parse_cli(argv)
    except cli_lib.HelpRequested as e:
        cli_lib.print_help(config=e.config)
        return None
    if not workdir:
        raise SystemExit("--workdir is required: the directory for checkpoints, metrics and results")
    cfg = resolved_config(spec, overrides)
    # Multi-host set-up must precede any other JAX call.
    sharding.initialize_distributed(cfg.get("distributed"))
    from ftjax.train import preflight
    preflight.check(cfg)  # mesh, batch and weight headers: seconds, before the data stage
    cfg_hash = config_utils.write_resolved_config(cfg, workdir)
    trainer = cfg.get("trainer", "sft")
    print(f"ftjax: trainer={trainer} config={spec} hash={cfg_hash} workdir={workdir}")
    from ftjax import trainers
    from ftjax import config_record, run_record
    record = run_record.RunRecord(workdir, config_record.to_jsonable(cfg), cfg_hash,
                                  argv=["ftjax"] + list(argv), spec=spec)
    try:
        summary = trainers.get(trainer).run(cfg, workdir)
    except BaseException as e:  # recorded, then raised as before
        status = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"
        record.finish(status, error=f"{type(e).__name__}: {e}")
        raise
    record.finish("finished", summary=summary if isinstance(summary, dict) else None)
    return summary


def cli() -> None:
    """The `ftjax` console script: configuration errors are one clear line and exit code 2.
    `ftjax serve ...` runs the OpenAI-compatible server (`python -m ftjax.serve`)."""
    if sys.argv[1:2] == ["serve"]:
        from ftjax.serve.__main__ import main as serve_main
        serve_main(sys.argv[2:])
        return
    from ftjax import hostmem
    hostmem.reexec_tuned()  # CPU: reuse the step's host buffers (FTJAX_HOST_MALLOC=system: off)
    from ftjax import cli as cli_lib
    cli_lib.run_main(main)


if __name__ == "__main__":
    cli()
