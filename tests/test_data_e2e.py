"""The data stage end to end: prepare on the shipped sample files (report, splits, cache, bad
input), and the `sft` trainer on JSONL, CSV and Parquet files through the CLI."""
import json
import os

import numpy as np
import pytest

from configs import common
from configs.sft_file import PLAIN_TEMPLATE, repo_path
from ftjax import data as ftdata
from ftjax import main as ftmain
from ftjax.data.errors import DataError
from ftjax.data.pipeline import make_loader, prepare

TOK = ftdata.CharTokenizer()
SAMPLES = repo_path("experiments/data_samples")


def sample(name):
    return os.path.join(SAMPLES, name)


def data_cfg(source, **kw):
    kw.setdefault("template", PLAIN_TEMPLATE)
    return common.data_file(source, **kw)


def test_prepare_counts_cleans_splits_and_caches(tmp_path, capsys):
    p = prepare(data_cfg(sample("instruction.jsonl")), TOK, str(tmp_path), seq_len=48)
    assert p.kind == "sft" and {k: len(v) for k, v in p.splits.items()} == \
        {"train": 386, "validation": 96}
    rep = json.load(open(tmp_path / "data_report.json"))
    text = open(tmp_path / "data_report.txt").read()
    assert "exact_duplicate: 18" in text and "386" in text
    out = capsys.readouterr().out
    assert rep and "WARNING" in out  # < 1000 training examples
    # The local file is built into ArrayRecord, and the run says so (not TFDS' "Downloading").
    assert "data: building the ArrayRecord cache of " in out and "ownload" not in out
    # PII is masked in what the loader reads; the 4 e-mail rows collapse to 1 after masking.
    users = [p.splits[s][i]["messages"][0]["content"] for s in p.splits
             for i in range(len(p.splits[s]))]
    assert sum("<EMAIL>" in u for u in users) == 1 and not any("@example.com" in u for u in users)
    assert sum("<PHONE>" in u for u in users) == 1
    # No example in two splits; splits are disjoint record references.
    refs = [tuple(r) for v in p.splits.values() for r in v.refs]
    assert len(refs) == len(set(refs)) == 482
    # A second prepare (a resumed run) reuses the cached splits exactly.
    again = prepare(data_cfg(sample("instruction.jsonl")), TOK, str(tmp_path), seq_len=48)
    out = capsys.readouterr().out
    assert "reusing the prepared splits" in out and "data: reusing the ArrayRecord cache" in out
    for k in p.splits:
        np.testing.assert_array_equal(again.splits[k].refs, p.splits[k].refs)
    # Other options -> a new fingerprint -> prepared again.
    other = prepare(data_cfg(sample("instruction.jsonl"), splits=dict(seed=1)), TOK,
                    str(tmp_path), seq_len=48)
    assert other.fingerprint != p.fingerprint
    assert not np.array_equal(other.splits["train"].refs, p.splits["train"].refs)


def test_malformed_lines_and_missing_fields(tmp_path):
    bad = sample("instruction_malformed.jsonl")
    with pytest.raises(DataError, match=r"instruction_malformed.jsonl:7: malformed JSON.*2035-01"):
        prepare(data_cfg(bad), TOK, str(tmp_path / "a"), seq_len=48)
    p = prepare(data_cfg(bad, on_error="skip"), TOK, str(tmp_path / "b"), seq_len=48)
    text = open(tmp_path / "b" / "data_report.txt").read()
    assert "malformed: 1" in text and "bad_record: 1" in text
    assert sum(len(v) for v in p.splits.values()) == 18  # 20 lines - 2 counted drops
    # A record without `output`, read on its own: the error names the field and what is there.
    lines = open(bad).read().splitlines()
    one = tmp_path / "one.jsonl"
    one.write_text(lines[12] + "\n" + lines[0] + "\n")
    with pytest.raises(DataError, match=r"one.jsonl:1.*'output'.*instruction"):
        prepare(data_cfg(str(one), format="instruction"), TOK, str(tmp_path / "c"), seq_len=48)


def test_everything_truncated_away_is_explained(tmp_path):
    # The alpaca preamble alone is ~100 tokens: right truncation to 33 leaves no completion.
    with pytest.raises(DataError, match=r"(?s)kept no examples \(300 left with nothing to train.*"
                                        r"max_len=33.*no_targets: 300"):
        prepare(data_cfg(sample("chat.jsonl"), template="alpaca"), TOK, str(tmp_path),
                seq_len=32)


def test_classification_splits_are_stratified_and_resampled(tmp_path):
    d = data_cfg(sample("classification.csv"), imbalance=dict(oversample="balanced"))
    p = prepare(d, TOK, str(tmp_path), seq_len=32)
    assert p.kind == "classification" and p.labels == ("date", "fact", "math", "word")
    val = p.split_labels["validation"]
    assert {k: val.count(k) for k in p.labels} == {"date": 20, "fact": 8, "math": 40, "word": 12}
    train = p.split_labels["train"]
    assert len(set(train.count(k) for k in p.labels)) == 1  # balanced by oversampling
    b = next(make_loader(p, "train", TOK, 8, 32, seed=0))
    assert b["label"].shape == (8,) and set(b["label"].tolist()) <= {0, 1, 2, 3}


def test_mixture_of_weighted_sources(tmp_path):
    d = data_cfg("", sources=({"source": sample("instruction.csv"), "weight": 3.0},
                              {"source": sample("chat.jsonl"), "weight": 1.0}),
                 imbalance=dict(mixture_examples=400))
    p = prepare(d, TOK, str(tmp_path), seq_len=48)
    src = p.splits["train"].refs[:, 0]
    assert len(src) == 400 and 0.65 < np.mean(src == 0) < 0.85  # ~3:1
    assert set(p.splits["validation"].refs[:, 0]) == {0, 1}  # validation: both sources, unmixed
    assert "train mixture" in open(tmp_path / "data_report.txt").read()


def test_kfold_validation_folds_cover_everything(tmp_path):
    folds = []
    for f in range(3):
        d = data_cfg(sample("instruction.csv"), splits=dict(kfold=3, fold=f))
        p = prepare(d, TOK, str(tmp_path / str(f)), seq_len=48)
        folds.append({tuple(r) for r in p.splits["validation"].refs})
        assert not folds[-1] & {tuple(r) for r in p.splits["train"].refs}
    assert not (folds[0] & folds[1]) and len(folds[0] | folds[1] | folds[2]) == 300


def test_text_and_preference_sources(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("first paragraph line\nstill the first\n\nsecond one\n\n\nthird\n")
    p = prepare(data_cfg(f"text:{txt}", template="", text_unit="paragraph",
                         splits=dict(ratios=(1.0,))), TOK, str(tmp_path / "t"), seq_len=64)
    assert p.kind == "text" and len(p.split("train")) == 3
    b = next(make_loader(p, "train", TOK, 1, 64, seed=0, shuffle=False, num_epochs=1))
    seg = b["segment_ids"][0]
    assert seg.max() == 3 and b["positions"][0][seg == 2][0] == 0  # 3 packed documents
    docs = [TOK.decode(b["inputs"][0][seg == k].tolist()) for k in (1, 2, 3)]
    assert docs == ["first paragraph line\nstill the first", "second one", "third"]
    pref = prepare(data_cfg(sample("preference.jsonl")), TOK, str(tmp_path / "p"), seq_len=48)
    assert pref.kind == "preference"
    b = next(make_loader(pref, "train", TOK, 4, 48, seed=0))
    for r in range(4):  # the pair shares its prompt; only the completions are trained
        c, j = (b[f"{h}_inputs"][r][b[f"{h}_segment_ids"][r] > 0] for h in ("chosen", "rejected"))
        start = int(np.argmax(b["chosen_loss_mask"][r] > 0))
        np.testing.assert_array_equal(c[:start], j[:start])
        assert TOK.decode(c[:start].tolist()).startswith("reverse ")


def test_wrong_kind_for_the_sft_trainer_is_refused(tmp_path):
    with pytest.raises(DataError, match="this data is 'preference'"):
        ftmain.main(["--config", f"configs/sft_file.py:path={sample('preference.jsonl')},steps=2",
                     "--workdir", str(tmp_path), "--config.train.progress=false"])


def _run(tmp_path, name, *extra, steps=20):
    wd = tmp_path / name.replace(".", "_")
    summary = ftmain.main(["--config", f"configs/sft_file.py:path={sample(name)},steps={steps},"
                           "eval_examples=0", "--workdir", str(wd),
                           "--config.train.progress=false", "--config.train.tensorboard=false",
                           "--config.train.log_every=5", "--config.train.eval_every=10",
                           *extra])
    rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    return wd, summary, losses


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [
    ("instruction.jsonl", ()),
    ("instruction.csv", ()),
    ("qa.parquet", ("--config.data.field_map=instruction=question,output=answer",
                    "--config.data.format=instruction")),
])
def test_cli_trains_on_a_file(tmp_path, name, extra):
    wd, summary, losses = _run(tmp_path, name, *extra)
    assert losses[-1] < 0.5 * losses[0]
    assert summary["evals"][-1]["eval_loss"] < summary["evals"][0]["eval_loss"]
    assert (wd / "data_report.json").exists() and (wd / "data_report.txt").exists()
    assert summary["data"]["kind"] == "sft" and summary["data"]["packing"]["efficiency"] > 0.8


@pytest.mark.slow
def test_learning_check_exact_match_rises(tmp_path):
    """The quickstart base has 0% on dmy2iso; fine-tuning on the shipped JSONL lifts it."""
    from configs.sft_file import get_config
    from ftjax.io.params_file import load_params
    from ftjax.eval.harness import chat_exact_match
    from ftjax.train.run import model_config
    wd, summary, losses = _run(tmp_path, "instruction.jsonl", "--config.data.eval_examples=96",
                               steps=60)
    cfg = get_config()
    mcfg = model_config(cfg.model)
    _, base = load_params(cfg.model.init_from, expected_cfg=mcfg)
    p = prepare(data_cfg(sample("instruction.jsonl")), TOK, str(wd), seq_len=96, verbose=False)
    view = p.split("validation")
    before = chat_exact_match(base, mcfg, TOK, [view[i] for i in range(len(view))],
                              template=PLAIN_TEMPLATE, max_new_tokens=16)
    assert before["n"] == summary["n_test"] == 96
    assert before["exact_match"] < 0.1 and summary["exact_match"] > 0.8
    assert summary["exact_match_before"] == before["exact_match"]  # the run's own before score
