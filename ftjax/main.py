"""Command-line entry point: `python -m ftjax.main --config configs/NAME.py[:args] --workdir DIR`.

Overrides: `--config.a.b=value` (typed by the existing field; unknown keys are rejected).
The resolved config and its hash are written into the workdir before anything runs; an
existing checkpoint in the workdir is resumed.
"""
from __future__ import annotations

import importlib
import sys

TRAINERS = {
    "sft": "ftjax.train.sft",
    "quickstart": "ftjax.quickstart",
    "classify": "ftjax.train.classify",
    "dpo": "ftjax.align.trainer",
    "memory_tuning": "ftjax.train.memory_tuning",
}


def main(argv: list[str] | None = None) -> dict:
    from ftjax import config_utils, sharding
    argv = sys.argv[1:] if argv is None else argv
    spec, workdir, overrides, _ = config_utils.parse_cli(argv)
    if not workdir:
        raise SystemExit("--workdir is required: the directory for checkpoints, metrics and results")
    cfg = config_utils.apply_overrides(config_utils.load_config(spec), overrides)
    # Multi-host set-up must precede any other JAX call.
    sharding.initialize_distributed(cfg.get("distributed"))
    cfg_hash = config_utils.write_resolved_config(cfg, workdir)
    trainer = cfg.get("trainer", "sft")
    if trainer not in TRAINERS:
        raise SystemExit(f"config.trainer={trainer!r} is not known; choose one of {sorted(TRAINERS)}")
    print(f"ftjax: trainer={trainer} config={spec} hash={cfg_hash} workdir={workdir}")
    return importlib.import_module(TRAINERS[trainer]).run(cfg, workdir)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # configuration errors: one clear line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
