"""Writes the example evaluation tasks in experiments/data_samples/eval/ (one per task kind).

    python scripts/make_eval_examples.py [--out DIR] [--n 100]

Every record comes from the held-out test split of the built-in synthetic tasks with the
quickstart's split settings (2000 examples, seed 0, test fraction 0.2), so the quickstart
model never trained on them and `python -m ftjax.evaluate --tasks examples` compares a base and
its fine-tuned model fairly. The prompts use the synthetic suite's layout (`prompt "\\n"`
then the answer), which the character-tokenizer models of the quickstart were trained on.

  dmy2iso_mc.jsonl         multiple_choice: the ISO date among 3 distractors
  dmy2iso_gen.jsonl        generation, greedy: exact match, token F1, ROUGE-L, BLEU
  add_sampled.jsonl        generation, 4 samples at temperature 0.8: pass@1/2/4
  synthetic_text.jsonl     perplexity over documents longer than the model's 64 positions
  dmy2iso_prompted.jsonl   perplexity of the answer given the prompt

Deterministic: the same files on every machine (the synthetic suite's own PRNG).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ftjax.data import synthetic  # noqa: E402

OUT = os.path.join(ROOT, "experiments", "data_samples", "eval")


def _test_split(task: str) -> list[dict]:
    return synthetic.make_splits(task, 2000, 0, 0.2)[1]


def _date_distractors(iso: str) -> list[str]:
    """Three wrong ISO dates close to the right one: day and month swapped (or the day
    moved when they are equal), the year off by one, and the day off by one."""
    y, m, d = iso.split("-")
    swapped = f"{y}-{d}-{m}" if d != m else f"{y}-{m}-{int(d) % 28 + 1:02d}"
    year = f"{int(y) + 1}-{m}-{d}"
    day = f"{y}-{m}-{int(d) % 28 + 1:02d}" if f"{y}-{m}-{int(d) % 28 + 1:02d}" != swapped \
        else f"{y}-{m}-{(int(d) + 1) % 28 + 1:02d}"
    return [swapped, year, day]


def write(path: str, header: dict, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"ftjax_task": header}) + "\n")
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({len(records)} records)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=OUT)
    p.add_argument("--n", type=int, default=100, help="records per task")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rng = synthetic.DeterministicRng("eval-examples")
    dates = _test_split("dmy2iso")[:args.n]

    mc = []
    for ex in dates:
        choices = [ex["answer"]] + _date_distractors(ex["answer"])
        gold = rng.randint(0, 3)
        choices[0], choices[gold] = choices[gold], choices[0]
        mc.append({"context": ex["prompt"] + "\n", "choices": choices, "answer": gold})
    write(os.path.join(args.out, "dmy2iso_mc.jsonl"),
          {"kind": "multiple_choice", "target_delimiter": ""}, mc)

    write(os.path.join(args.out, "dmy2iso_gen.jsonl"),
          {"kind": "generation", "max_new_tokens": 12,
           "metrics": ["exact_match", "token_f1", "rouge_l", "bleu"]},
          [{"prompt": ex["prompt"] + "\n", "answer": ex["answer"]} for ex in dates])

    adds = _test_split("add")[:args.n // 2]
    write(os.path.join(args.out, "add_sampled.jsonl"),
          {"kind": "generation", "max_new_tokens": 8, "extract": "last_number",
           "num_samples": 4, "temperature": 0.8, "pass_k": [1, 2, 4]},
          [{"prompt": ex["prompt"] + "\n", "answer": ex["answer"]} for ex in adds])

    docs = []
    text_tasks = [t for t in synthetic.PRETRAIN_TASKS if t != "lookup"]  # 192 facts only
    pools = {t: _test_split(t) for t in text_tasks}
    for i in range(args.n // 4):
        parts = [pools[t][i] for t in text_tasks]
        docs.append({"text": "".join(f"{e['prompt']}\n{e['answer']}\n" for e in parts)})
    write(os.path.join(args.out, "synthetic_text.jsonl"), {"kind": "perplexity"}, docs)

    write(os.path.join(args.out, "dmy2iso_prompted.jsonl"), {"kind": "perplexity"},
          [{"prompt": ex["prompt"] + "\n", "completion": ex["answer"]} for ex in dates])


if __name__ == "__main__":
    main()
