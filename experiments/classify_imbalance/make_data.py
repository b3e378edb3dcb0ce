"""Writes words.csv: which transformation of the synthetic suite turned a word into another.

    python experiments/classify_imbalance/make_data.py

Text "payload>answer" (e.g. "etrp>prte"), label the task: reverse 60%, sort 24%, swap 10%,
caesar 6% of 2500 distinct rows. The two minority classes are the harder ones to read (swap
needs the word's midpoint, caesar a letter-by-letter shift), so a plain cross-entropy model
of this size learns the majority classes first.
"""
from __future__ import annotations

import csv
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from ftjax.data.synthetic import DeterministicRng, generate  # noqa: E402

COUNTS = {"reverse": 1500, "sort": 600, "swap": 250, "caesar": 150}
SEED = 7


def rows() -> list[dict]:
    out, seen = [], set()
    for task, n in COUNTS.items():
        got = 0
        for ex in generate(task, 4 * n, SEED):
            payload = ex["prompt"].split(" ", 1)[1]
            text = f"{payload}>{ex['answer']}"
            if text in seen or payload == ex["answer"]:  # e.g. a sorted word is its own sort
                continue
            seen.add(text)
            out.append({"text": text, "label": task})
            got += 1
            if got == n:
                break
        if got < n:
            raise RuntimeError(f"only {got} distinct {task} rows")
    DeterministicRng("classify-imbalance", "order").shuffle(out)
    return out


def main() -> None:
    path = os.path.join(HERE, "words.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["text", "label"])
        w.writeheader()
        w.writerows(rows())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
