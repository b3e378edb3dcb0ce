"""Writes the shipped sample datasets (one per format) from the built-in synthetic suite.

    python experiments/data_samples/make_samples.py            # rewrites the files here

Deterministic (the suite's own seeded generator), so the files only change when this script
does. Each file exercises a format of `ftjax/data/formats.py` and the cleaning of
`ftjax/data/clean.py`: the instruction file carries a few exact duplicates and rows with
e-mail addresses / phone numbers (masked as <EMAIL> / <PHONE>), and
`instruction_malformed.jsonl` has a broken line and a record without `output`, for the
bad-input errors.

    instruction.jsonl     instruction/output   dmy2iso (a task the quickstart base never saw)
    chat.jsonl            messages             double
    instruction.csv       instruction,output   swap
    qa.parquet            question,answer      caesar (map with field_map=
                                               "instruction=question,output=answer")
    preference.jsonl      prompt/chosen/rejected  reverse (rejected: the sorted letters)
    unpaired.jsonl        prompt/completion/label reverse, each prompt once: the answer (true)
                                               or the sorted letters (false), by a seeded coin
    classification.csv    text,label           payloads of four tasks, imbalanced labels
"""
from __future__ import annotations

import csv
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from ftjax.data.synthetic import DeterministicRng, make_splits  # noqa: E402

SEED = 0


def distinct(task: str, n: int) -> list[dict]:
    """n distinct examples of a task (train and test buckets together)."""
    train, test = make_splits(task, n, SEED, 0.2)
    out = train + test
    DeterministicRng("samples", task).shuffle(out)
    return out


def write_jsonl(name: str, rows: list[dict]) -> None:
    with open(os.path.join(HERE, name), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_csv(name: str, fields: list[str], rows: list[dict]) -> None:
    with open(os.path.join(HERE, name), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def instruction_rows() -> list[dict]:
    rows = [{"instruction": e["prompt"], "output": e["answer"]} for e in distinct("dmy2iso", 480)]
    dups = [dict(rows[i]) for i in range(0, 120, 10)]  # 12 exact duplicates
    pii = [{"instruction": f"contact {name}@example.com", "output": "noted"}
           for name in ("ana", "bo", "cy", "di")]
    pii += [{"instruction": f"call +1 415 555 01{k:02d}", "output": "noted"} for k in range(4)]
    rows = rows + dups + pii
    DeterministicRng("samples", "instruction-order").shuffle(rows)
    return rows


def main() -> None:
    write_jsonl("instruction.jsonl", instruction_rows())
    write_jsonl("chat.jsonl", [
        {"messages": [{"role": "user", "content": e["prompt"]},
                      {"role": "assistant", "content": e["answer"]}]}
        for e in distinct("double", 300)])
    write_csv("instruction.csv", ["instruction", "output"],
              [{"instruction": e["prompt"], "output": e["answer"]}
               for e in distinct("swap", 300)])
    import pyarrow as pa
    import pyarrow.parquet as pq
    qa = distinct("caesar", 300)
    pq.write_table(pa.table({"question": [e["prompt"] for e in qa],
                             "answer": [e["answer"] for e in qa]}),
                   os.path.join(HERE, "qa.parquet"))
    write_jsonl("preference.jsonl", [
        {"prompt": e["prompt"], "chosen": e["answer"],
         "rejected": "".join(sorted(e["prompt"].split(" ", 1)[1]))}
        for e in distinct("reverse", 300)
        if e["answer"] != "".join(sorted(e["prompt"].split(" ", 1)[1]))])
    coin = DeterministicRng("samples", "unpaired")
    unpaired = []
    for e in distinct("reverse", 300):
        wrong = "".join(sorted(e["prompt"].split(" ", 1)[1]))
        if wrong == e["answer"]:
            continue
        good = coin.randint(0, 1) == 1
        unpaired.append({"prompt": e["prompt"], "completion": e["answer"] if good else wrong,
                         "label": good})
    write_jsonl("unpaired.jsonl", unpaired)
    # Classification: what kind of payload is this? Imbalanced on purpose (math is common).
    classes = {"math": ("add", 200), "date": ("format", 100), "word": ("reverse", 60),
               "fact": ("lookup", 40)}
    rows = [{"text": e["prompt"].split(" ", 1)[1], "label": label}
            for label, (task, n) in classes.items() for e in distinct(task, n)]
    DeterministicRng("samples", "classification-order").shuffle(rows)
    write_csv("classification.csv", ["text", "label"], rows)
    good = instruction_rows()[:20]
    lines = [json.dumps(r) for r in good]
    lines[6] = lines[6][:-5]                      # line 7: truncated JSON
    lines[12] = json.dumps({"instruction": "dmy2iso 01/02/2003"})  # line 13: no output
    with open(os.path.join(HERE, "instruction_malformed.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
    for name in sorted(os.listdir(HERE)):
        if not name.endswith(".py"):
            print(f"{name:28s} {os.path.getsize(os.path.join(HERE, name)):7d} bytes")
