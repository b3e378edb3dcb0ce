"""Makes the quickstart's base model: pretrains it on the synthetic PRETRAIN_TASKS mixture.

    python experiments/quickstart_base/pretrain.py --workdir /tmp/quickstart_base
    python experiments/quickstart_base/pretrain.py --workdir /tmp/qb --config.base.train.steps=6000

The run is `ftjax.trainers._quickstart_base.pretrain_base` with the base settings of `configs/quickstart.py`
(architecture in `model`, data/optimizer/steps in `base`), exactly what the quickstart does
when it pretrains in the run; `--config` and `--config.<key>=VALUE` override them. An
interrupted run resumes from `<workdir>/checkpoints`. The result is copied to `--out`
(default: `model.safetensors` beside this script) with `results.json` (per-task exact match,
hashes, wall time) next to it, and a markdown table is printed for the README.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from ftjax import config_utils  # noqa: E402  (after the sys.path set-up)


def write_plot(info: dict, out_dir: str) -> str:
    """`pretrain_loss.png` beside the model: train and eval loss of the pretraining run."""
    from ftjax import plots  # pylint: disable=import-outside-toplevel
    curves = {label: tuple(zip(*info[key])) for label, key in
              (("train loss", "loss_curve"), ("eval loss (held-out prompts)", "eval_curve"))
              if info.get(key)}
    em = ", ".join(f"{t} {v:.0%}" for t, v in info["exact_match"].items())
    return plots.plot_loss_curves(os.path.join(out_dir, "pretrain_loss.png"),
                                  {"quickstart base: pretraining": curves},
                                  title=f"exact match: {em}", log_y=True)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    spec, workdir, overrides, extra = config_utils.parse_cli(argv, extra_flags=("out",),
                                                             require_config=False)
    spec = spec or os.path.join(REPO_ROOT, "configs", "quickstart.py")
    workdir = workdir or "/tmp/quickstart_base"
    out = extra.get("out") or os.path.join(HERE, "model.safetensors")
    cfg = config_utils.apply_overrides(config_utils.load_config(spec), overrides)
    cfg_hash = config_utils.write_resolved_config(cfg, workdir)

    from ftjax.trainers import _quickstart_base as quickstart  # pylint: disable=import-outside-toplevel
    print(f"pretraining the quickstart base: config={spec} hash={cfg_hash} "
          f"base={quickstart.base_hash(cfg)} workdir={workdir}")
    info = quickstart.pretrain_base(cfg, workdir)
    if os.path.abspath(info["path"]) != os.path.abspath(out):
        shutil.copyfile(info["path"], out)
    results = {k: v for k, v in info.items() if k not in ("loss_curve", "eval_curve", "path")}
    results.update(config_hash=cfg_hash, file=os.path.basename(out),
                   file_bytes=os.path.getsize(out),
                   final_train_loss=info["loss_curve"][-1][1] if info["loss_curve"] else None,
                   final_eval_loss=info["eval_curve"][-1][1] if info["eval_curve"] else None)
    with open(os.path.join(os.path.dirname(os.path.abspath(out)), "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    png = write_plot(info, os.path.dirname(os.path.abspath(out)))
    print(f"\nwrote {out} ({results['file_bytes'] / 2**20:.2f} MiB) and {png}\n")
    print("| task | exact match | scored on |")
    print("|---|---|---|")
    for task, em in info["exact_match"].items():
        on = "training facts (recall)" if task == "lookup" else "held-out test prompts"
        print(f"| {task} | {em:.1%} | {info['n_scored'][task]} {on} |")
    return results


if __name__ == "__main__":
    main()
