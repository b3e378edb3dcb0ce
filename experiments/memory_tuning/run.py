"""Memory tuning sweep: the default memory-experts run and its ablations, one run each.

Every run is `python -m ftjax.main --config configs/memory_tuning.py:ARGS` in a fresh workdir;
this script collects each run's summary.json (fact recall before/after, held-out loss of the
other tasks before/after, trainable params, wall time) into `results/<name>.json` and a table
in `results_table.md` beside it (results.md quotes and discusses it).

    python experiments/memory_tuning/run.py [--runs default,lora_matched] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (config argument, extra overrides, what it shows)
RUNS = {
    "default": ("", [], "memory experts: 256 experts, top-4, rank 4, layers 1-3, null expert, "
                        "50% fresh replay"),
    "no_null": ("null_expert=false", [], "gate without the null expert"),
    "no_replay": ("replay_frac=0.0", [], "facts only, no replay"),
    "memory_matched": ("num_experts=64", [], "64 experts (trainable params = lora_matched)"),
    "lora_matched": ("method=lora,lora_rank=62,lr=0.003", [],
                     "LoRA rank 62 on all 7 projections, lr 3e-3 (params = memory_matched)"),
    "lora_matched_lr1e-2": ("method=lora,lora_rank=62,lr=0.01", [], "the same LoRA at lr 1e-2"),
    "full": ("method=full,lr=0.001", [], "full fine-tuning, lr 1e-3"),
}


def run_one(name: str, out: str) -> dict:
    arg, extra, what = RUNS[name]
    workdir = os.path.join(out, name)
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resumed one
    spec = "configs/memory_tuning.py" + (f":{arg}" if arg else "")
    cmd = [sys.executable, "-m", "ftjax.main", "--config", spec, "--workdir", workdir,
           "--config.train.progress=False"] + extra
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"name": name, "error": proc.stderr[-1500:] or proc.stdout[-1500:]}
    s = json.load(open(os.path.join(workdir, "summary.json")))
    return {"name": name, "what": what, "command": " ".join(cmd[1:]), "method": s["method"],
            "trainable_params": s["trainable_params"], "steps": s["steps"],
            "recall_before": s["recall_before"], "recall_after": s["recall_after"],
            "recall_unseen_before": s["before"]["facts"]["recall_unseen"],
            "recall_unseen_after": s["after"]["facts"]["recall_unseen"],
            "recall_seen_after": s["after"]["facts"]["recall_seen"],
            "other_loss_before": s["other_loss_before"], "other_loss_after": s["other_loss_after"],
            "other_loss_rel_change": s["other_loss_rel_change"],
            "other_loss_rel_change_per_task": s["other_loss_rel_change_per_task"],
            "other_exact_match_before": s["before"]["other_exact_match"],
            "other_exact_match_after": s["after"]["other_exact_match"],
            "wall_time_s": s["wall_time_s"], "train_s": s["timing_s"]["train"],
            "run_wall_s": round(time.time() - t0, 1), "config_hash": s["config_hash"]}


def to_markdown(rows: list[dict]) -> str:
    head = ("| run | method | trainable params | recall before | recall after | unseen after | "
            "other-task loss before | after | change | per task (add/reverse/sort/format) | "
            "other-task EM after | wall (s) |\n" + "|---" * 12 + "|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'].splitlines()[-1][:80]} |" + " |" * 10)
            continue
        per = r["other_loss_rel_change_per_task"]
        em = r["other_exact_match_after"]
        lines.append(
            f"| {r['name']} | {r['method']} | {r['trainable_params']:,} | {r['recall_before']:.1%} "
            f"| {r['recall_after']:.1%} | {r['recall_unseen_after']:.1%} | "
            f"{r['other_loss_before']:.4f} | {r['other_loss_after']:.4f} | "
            f"{r['other_loss_rel_change']:+.1%} | "
            + "/".join(f"{per[t]:+.0%}" for t in ("add", "reverse", "sort", "format")) + " | "
            + ", ".join(f"{t} {v:.0%}" for t, v in em.items()) + f" | {r['wall_time_s']:.0f} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--out", default=os.path.join(ROOT, "workdirs", "memory_tuning"))
    args = ap.parse_args()
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    for name in args.runs.split(","):
        row = run_one(name, args.out)
        print(json.dumps(row), flush=True)
        with open(os.path.join(HERE, "results", f"{name}.json"), "w") as f:
            json.dump(row, f, indent=2)
    rows = [json.load(open(os.path.join(HERE, "results", f"{n}.json")))
            for n in RUNS if os.path.exists(os.path.join(HERE, "results", f"{n}.json"))]
    with open(os.path.join(HERE, "results_table.md"), "w") as f:
        f.write(to_markdown(rows))
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
