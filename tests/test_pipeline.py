"""The Grain loader: exact resume, per-host sharding, epochs, workers, layouts, eval batches."""
import json

import jax
import numpy as np
import pytest

from configs import common
from ftjax import data as ftdata
from ftjax import models
from ftjax.data.errors import DataError
from ftjax.data.pipeline import Prepared, eval_batches, make_loader
from ftjax.train import loop
from ftjax.train.run import Run
from ftjax.train.step import sft_loss
from tests.test_train import _CrashAfter

TOK = ftdata.CharTokenizer()
# The synthetic suite's own layout: [bos] prompt "\n" answer [eos], answer + eos trained.
PLAIN = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
         "{{ m['content'] + '\n' }}{% elif m['role'] == 'assistant' %}"
         "{{ m['content'] + eos_token }}{% endif %}{% endfor %}")


def sft_examples(n, seed=0, tasks=("add", "reverse")):
    ex = ftdata.mixture(list(tasks), -(-n // len(tasks)), seed=seed)[:n]
    return [{"messages": [{"role": "user", "content": e["prompt"]},
                          {"role": "assistant", "content": e["answer"]}]} for e in ex]


def sft_prepared(n=120, n_val=24, **kw):
    ex = sft_examples(n)
    kw.setdefault("template", PLAIN)
    return Prepared.from_examples({"train": ex[:n - n_val], "validation": ex[n - n_val:]},
                                  "sft", **kw)


def take(loader, k):
    return [next(loader) for _ in range(k)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def documents(batches):
    """Token tuples of every packed document in the batches (inputs of the segment + its last
    target), in order."""
    out = []
    for b in batches:
        for r in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][r]
            for s in range(1, int(seg.max()) + 1):
                sel = seg == s
                out.append(tuple(b["inputs"][r][sel]) + (int(b["targets"][r][sel][-1]),))
    return out


def doc_tokens(prepared, split, seq_len=64):
    from ftjax.data.pipeline import encode_fn
    enc = encode_fn(prepared, TOK, seq_len)
    view = prepared.split(split)
    return [tuple(enc(view[i])["tokens"]) for i in range(len(view))]


@pytest.mark.parametrize("packing", ["best_fit", "first_fit", "none"])
def test_state_restores_exactly(packing):
    p = sft_prepared(pack_window=16)
    a = make_loader(p, "train", TOK, 4, 64, seed=3, packing=packing)
    take(a, 7)  # past several packing windows of 16 documents
    state = json.loads(json.dumps(a.get_state()))  # what the checkpoint stores
    want = take(a, 30)  # crosses epoch boundaries
    b = make_loader(p, "train", TOK, 4, 64, seed=3, packing=packing)
    b.set_state(state)
    assert_same(take(b, 30), want)
    # A fresh loader from the start reproduces the first run too (determinism).
    c = make_loader(p, "train", TOK, 4, 64, seed=3, packing=packing)
    d = make_loader(p, "train", TOK, 4, 64, seed=3, packing=packing)
    assert_same(take(c, 10), take(d, 10))


def test_state_mid_window_and_fresh_state():
    p = sft_prepared(pack_window=50)
    a = make_loader(p, "train", TOK, 2, 64, seed=0)
    states, seen = [], []
    for _ in range(12):
        states.append(json.loads(json.dumps(a.get_state())))
        seen.append(next(a))
    assert any(s["grain"]["rows_done"] > 0 for s in states)  # restored inside a window
    for k in (0, 5, 11):
        b = make_loader(p, "train", TOK, 2, 64, seed=0)
        b.set_state(states[k])
        assert_same(take(b, 12 - k), seen[k:])


def test_state_guards_against_a_changed_setup():
    p = sft_prepared()
    state = make_loader(p, "train", TOK, 4, 64, seed=0).get_state()
    with pytest.raises(DataError, match="batch_size=4 but this loader has batch_size=8"):
        make_loader(p, "train", TOK, 8, 64, seed=0).set_state(state)
    with pytest.raises(DataError, match="no 'grain' position"):
        make_loader(p, "train", TOK, 4, 64, seed=0).set_state({"step": 3})


def test_epochs_reshuffle_deterministically():
    p = sft_prepared(packing="none")
    n = len(p.split("train"))  # 96 examples, batch 8: 12 batches per epoch
    a = take(make_loader(p, "train", TOK, 8, 64, seed=1), 24)
    epoch = [documents(a[:12]), documents(a[12:])]
    everything = sorted(doc_tokens(p, "train"))
    assert sorted(epoch[0]) == everything and sorted(epoch[1]) == everything
    assert epoch[0] != epoch[1]  # a new permutation each epoch
    other = documents(take(make_loader(p, "train", TOK, 8, 64, seed=2), 12))
    assert other != epoch[0] and len(epoch[0]) == n
    unshuffled = documents(take(make_loader(p, "train", TOK, 8, 64, seed=1, shuffle=False), 12))
    assert unshuffled == doc_tokens(p, "train")


@pytest.mark.parametrize("packing", ["none", "best_fit"])
def test_processes_see_disjoint_shards_covering_everything(packing):
    p = sft_prepared(n=124)  # 100 train examples
    seen = []
    for proc in range(2):
        it = make_loader(p, "train", TOK, 2, 64, seed=5, process_index=proc, process_count=2,
                         packing=packing, num_epochs=1)
        batches = list(it)
        assert all(b["inputs"].shape == (1, 64) for b in batches)  # local batch B / P
        seen.append(documents(batches))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(doc_tokens(p, "train"))
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_packed_batches_hold_the_documents():
    p = sft_prepared()
    it = make_loader(p, "train", TOK, 4, 64, seed=0, num_epochs=1, packing="best_fit")
    batches = list(it)
    docs = documents(batches)
    # One epoch: no document twice (the rows of a last partial batch are dropped).
    assert len(docs) == len(set(docs)) and set(docs) <= set(doc_tokens(p, "train"))
    assert it.pack_stats.efficiency > 0.8 and it.pack_stats.documents == 96
    # Several documents share a row; masks are the completion-only ones.
    assert max(int(b["segment_ids"].max()) for b in batches) > 1
    for b in batches:
        assert not b["loss_mask"][b["segment_ids"] == 0].any()


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(tmp_path):
    # File-backed records (ArrayRecord through TFDS), pickled into the worker processes.
    from configs import common
    from ftjax.data.pipeline import prepare
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(e) + "\n" for e in sft_examples(120)))
    p = prepare(common.data_file(f"jsonl:{src}", template=PLAIN, pack_window=16), TOK,
                str(tmp_path), seq_len=64, verbose=False)
    zero = make_loader(p, "train", TOK, 4, 64, seed=2, num_workers=0)
    two = make_loader(p, "train", TOK, 4, 64, seed=2, num_workers=2)
    try:
        assert_same(take(two, 6), take(zero, 6))
        state = json.loads(json.dumps(two.get_state()))
        want = take(two, 8)
    finally:
        two.close()
    again = make_loader(p, "train", TOK, 4, 64, seed=2, num_workers=2)
    try:
        again.set_state(state)
        assert_same(take(again, 8), want)
    finally:
        again.close()
    assert_same(take(zero, 8), want)


def test_empty_or_too_small_split_is_a_clear_error():
    p = Prepared.from_examples({"train": sft_examples(3), "validation": []}, "sft",
                               template=PLAIN)
    with pytest.raises(DataError, match="'train' split has 3 examples, fewer than one batch of 4"):
        make_loader(p, "train", TOK, 4, 64, seed=0)
    with pytest.raises(DataError, match="'validation' split is empty"):
        eval_batches(p, "validation", TOK, 4, 64)
    with pytest.raises(DataError, match="no split 'test'"):
        make_loader(p, "test", TOK, 2, 64, seed=0)
    with pytest.raises(DataError, match="not divisible by process_count 2"):
        make_loader(p, "train", TOK, 3, 64, seed=0, process_count=2)


def test_eval_batches_cover_every_example_once():
    p = sft_prepared(n=64 + 37, n_val=37)
    want = sorted(doc_tokens(p, "validation"))
    for packing in ("none", "best_fit"):
        one = eval_batches(p, "validation", TOK, 8, 64, packing=packing)
        assert sorted(documents(one)) == want
        halves = [eval_batches(p, "validation", TOK, 8, 64, proc, 2, packing=packing)
                  for proc in range(2)]
        assert len(halves[0]) == len(halves[1]) == len(one)  # same number of eval steps
        assert sorted(documents(halves[0]) + documents(halves[1])) == want
    padded = eval_batches(p, "validation", TOK, 8, 64, packing="none")
    assert len(padded) == 5 and not padded[-1]["segment_ids"][5:].any()
    assert not padded[-1]["loss_mask"][5:].any()


def test_preference_batches_keep_pairs_in_the_same_row():
    ex = [{"prompt": [{"role": "user", "content": f"q{i}"}],
           "chosen": [{"role": "assistant", "content": f"good {i}"}],
           "rejected": [{"role": "assistant", "content": f"bad {i} bad"}]} for i in range(20)]
    p = Prepared.from_examples({"train": ex}, "preference", template=PLAIN)
    b = next(make_loader(p, "train", TOK, 4, 32, seed=0))
    keys = {f"{h}_{k}" for h in ("chosen", "rejected") for k in
            ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
    assert set(b) == keys | {"margin"}
    np.testing.assert_array_equal(b["margin"], np.zeros((4, 1), np.float32))  # none given
    for r in range(4):
        c = TOK.decode(b["chosen_inputs"][r][b["chosen_segment_ids"][r] > 0].tolist())
        j = TOK.decode(b["rejected_inputs"][r][b["rejected_segment_ids"][r] > 0].tolist())
        i = c.split("\n")[0][1:]
        assert j.startswith(f"q{i}\n") and f"good {i}" in c and f"bad {i} bad" in j
        trained = TOK.decode(b["chosen_targets"][r][b["chosen_loss_mask"][r] > 0].tolist(),
                             stop_at_eos=False)
        assert trained == f"good {i}"  # completion only (eos dropped by decode)


def test_classification_batches_and_padding():
    ex = [{"text": f"item {i}", "label": "odd" if i % 2 else "even"} for i in range(30)]
    p = Prepared.from_examples({"train": ex[:20], "validation": ex[20:]}, "classification")
    assert p.labels == ("even", "odd")
    b = next(make_loader(p, "train", TOK, 4, 16, seed=0))
    assert set(b) == {"inputs", "segment_ids", "positions", "label", "label_weight"}
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
    for r in range(4):
        text = TOK.decode(b["inputs"][r][b["segment_ids"][r] > 0].tolist())
        assert b["label"][r] == int(text.split()[-1]) % 2
    ev = eval_batches(p, "validation", TOK, 4, 16)
    assert len(ev) == 3 and ev[-1]["label_weight"].tolist() == [1, 1, 0, 0]


# ---- end to end through the training loop: crash, resume, same batches and losses -----------

TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, max_position_embeddings=64)


class _Recorder:
    """Records the batches the loop draws."""

    def __init__(self, it):
        self.it, self.seen = it, []

    def __next__(self):
        b = next(self.it)
        self.seen.append(b)
        return b

    def get_state(self):
        return self.it.get_state()

    def set_state(self, s):
        self.it.set_state(s)


@pytest.mark.slow
def test_resume_through_the_training_loop(tmp_path):
    c = common.base("sft")
    c.model = common.model("llama", **TINY)
    c.optimizer = common.optimizer("adamw", learning_rate=3e-3, warmup_steps=2)
    c.train = common.train(steps=10, batch_size=8, seq_len=48, log_every=1, progress=False,
                           tensorboard=False, async_checkpoint=False, checkpoint_every=4)
    from ftjax.train.run import model_config
    mcfg = model_config(c.model)
    p = sft_prepared(n=200, pack_window=32)

    def run(workdir, it):
        return loop.train(Run.of(c, str(workdir), model_cfg=mcfg,
                                 init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0))),
                          sft_loss(mcfg), it)

    def loader():
        return make_loader(p, "train", TOK, 8, 48, seed=1)

    full_rec = _Recorder(loader())
    full = run(tmp_path / "a", full_rec)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", _CrashAfter(loader(), 6))
    resumed_rec = _Recorder(loader())
    resumed = run(tmp_path / "b", resumed_rec)
    assert resumed.resumed_from == 4
    assert_same(resumed_rec.seen, full_rec.seen[4:])  # batches 5..10, exactly
    ref = {h["step"]: h["loss"] for h in full.history}
    got = {h["step"]: h["loss"] for h in resumed.history}
    assert sorted(got) == list(range(5, 11))
    for s in got:
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-7), s
    assert ref[10] < ref[1]  # and it learns


def test_unpaired_rows_carry_the_label():
    ex = [{"prompt": [{"role": "user", "content": f"q{i}"}],
           "completion": [{"role": "assistant", "content": f"a{i}"}], "label": i % 3 == 0}
          for i in range(12)]
    p = Prepared.from_examples({"train": ex}, "unpaired", template=PLAIN)
    b = next(make_loader(p, "train", TOK, 4, 32, seed=0, shuffle=False))
    assert b["label"].tolist() == [1, 0, 0, 1] and b["label_weight"].tolist() == [1, 1, 1, 1]
    assert TOK.decode(b["targets"][1][b["loss_mask"][1] > 0].tolist()) == "a1"


def test_stratified_batches_hold_every_label_in_proportion():
    labels = ["a"] * 48 + ["b"] * 24 + ["c"] * 24
    ex = [{"text": f"{lab} {i}", "label": lab} for i, lab in enumerate(labels)]
    p = Prepared.from_examples({"train": ex}, "classification", stratify_batches=True)
    it = make_loader(p, "train", TOK, 8, 16, seed=0)
    first = take(it, 15)  # past the 12 batches of an epoch
    for b in first:
        assert sorted(np.bincount(b["label"], minlength=3).tolist()) == [2, 2, 4]
    state = json.loads(json.dumps(it.get_state()))
    want = take(it, 5)
    again = make_loader(p, "train", TOK, 8, 16, seed=0)
    again.set_state(state)
    assert_same(take(again, 5), want)
    halves = [next(make_loader(p, "train", TOK, 8, 16, seed=0, process_index=k, process_count=2))
              for k in range(2)]
    both = np.concatenate([h["label"] for h in halves])
    np.testing.assert_array_equal(both, first[0]["label"])  # the same global batch, split


def test_state_refuses_another_worker_count():
    p = sft_prepared()
    state = make_loader(p, "train", TOK, 4, 64, seed=0).get_state()
    with pytest.raises(DataError, match="num_workers=0 but this loader has num_workers=2"):
        make_loader(p, "train", TOK, 4, 64, seed=0, num_workers=2).set_state(state)


def test_preference_margin_column_follows_its_pair():
    """An optional per-pair `margin` (reward models' Bradley-Terry margin) rides in the batch
    as [B, 1], row i with pair i; a non-number is refused naming the field."""
    from ftjax.data.formats import to_canonical
    ex = [{"prompt": [{"role": "user", "content": f"q{i}"}],
           "chosen": [{"role": "assistant", "content": f"good {i}"}],
           "rejected": [{"role": "assistant", "content": f"bad {i}"}], "margin": i / 4}
          for i in range(12)]
    p = Prepared.from_examples({"train": ex}, "preference", template=PLAIN)
    b = next(make_loader(p, "train", TOK, 4, 32, seed=0))
    assert b["margin"].shape == (4, 1)
    for r in range(4):
        c = TOK.decode(b["chosen_inputs"][r][b["chosen_segment_ids"][r] > 0].tolist())
        i = int(c.split("\n")[0][1:])
        assert b["margin"][r, 0] == np.float32(i / 4)
    rec = {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "large"}
    with pytest.raises(Exception, match="margin"):
        to_canonical(rec, "preference")
    assert to_canonical(dict(rec, margin="1.5"), "preference")["margin"] == 1.5
