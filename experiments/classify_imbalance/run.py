"""Plain vs class-weighted cross-entropy vs focal loss (vs oversampling) on an imbalanced
classification file.

    python experiments/classify_imbalance/run.py [--steps 800] [--seeds 0,1] [--parallel 2]

Trains `configs/classify_file.py` on words.csv (make_data.py) once per (loss, seed), each in
its own workdir under workdirs/classify_imbalance/ (git-ignored; an existing summary.json is
reused), then writes results.json (with each run's config hash) and
prints the markdown table of docs/data_imbalance.md (validation split, 500 examples).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
VARIANTS = {  # name -> typed config arguments
    "ce": "loss=ce",
    "weighted": "loss=weighted,weights=inverse",
    "focal": "loss=focal,gamma=2",
    "focal_alpha": "loss=focal,gamma=2,focal_alpha=class_weights",
    "oversample": "loss=ce,sampling=oversample",
}
MINORITY = ("swap", "caesar")


def run_one(name: str, seed: int, steps: int, lr: float) -> dict:
    wd = os.path.join(ROOT, "workdirs", "classify_imbalance", f"{name}_s{seed}")
    summary = os.path.join(wd, "summary.json")
    if not os.path.exists(summary):
        arg = (f"path=csv:{os.path.join(HERE, 'words.csv')},steps={steps},seed={seed},"
               + VARIANTS[name])
        cmd = [sys.executable, "-m", "ftjax.main", "--config", f"configs/classify_file.py:{arg}",
               "--workdir", wd, f"--config.optimizer.learning_rate={lr}",
               "--config.train.eval_every=200", "--config.train.checkpoint_every=0",
               "--config.train.progress=False"]
        os.makedirs(wd, exist_ok=True)
        with open(os.path.join(wd, "log.txt"), "w") as log:
            subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    with open(summary) as f:
        s = json.load(f)
    m = s["metrics"]["validation"]
    i = {c: k for k, c in enumerate(m["classes"])}
    with open(os.path.join(wd, "config_hash.txt")) as f:
        config_hash = f.read().strip()
    row = {"variant": name, "seed": seed, "config_hash": config_hash,
           "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
           "macro_recall": m["macro_recall"], "macro_pr_auc": m["macro_pr_auc"],
           "wall_s": s["wall_s"]}
    for c in m["classes"]:
        row[f"recall_{c}"] = m["recall"][i[c]]
        row[f"f1_{c}"] = m["f1"][i[c]]
    return row


def table(rows: list[dict]) -> str:
    cols = (["accuracy", "macro_f1", "macro_recall", "macro_pr_auc"]
            + [f"{k}_{c}" for c in MINORITY for k in ("recall", "f1")] + ["recall_reverse"])
    out = ["| loss | seed | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for r in rows:
        out.append(f"| {r['variant']} | {r['seed']} | "
                   + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    seeds = sorted({r["seed"] for r in rows})
    if len(seeds) > 1:  # mean over seeds, per variant
        for v in dict.fromkeys(r["variant"] for r in rows):
            rs = [r for r in rows if r["variant"] == v]
            out.append(f"| **{v}** | mean | " + " | ".join(
                f"{sum(r[c] for r in rs) / len(rs):.3f}" for c in cols) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", default="0")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--parallel", type=int, default=1)
    a = p.parse_args()
    jobs = [(v, int(s)) for s in a.seeds.split(",") for v in a.variants.split(",")]
    with ThreadPoolExecutor(a.parallel) as ex:
        rows = list(ex.map(lambda j: run_one(j[0], j[1], a.steps, a.lr), jobs))
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump({"steps": a.steps, "lr": a.lr, "rows": rows}, f, indent=2)
    print(table(rows))


if __name__ == "__main__":
    main()
