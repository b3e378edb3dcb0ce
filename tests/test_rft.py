"""Trainer "rft" (rejection-sampling fine-tuning): the one-file trainer of
docs/architecture.md. Its batches hold only answers the checker accepted, sampled from the
current policy; trained on them, the quickstart base gets better at `add`."""
import numpy as np
import pytest

from ftjax import config_utils
from ftjax import data as ftdata
from ftjax.main import main
from ftjax.train.run import Run
from ftjax.trainers import resolve_config
from ftjax.trainers.rft import RejectionSampler


def test_batches_hold_only_accepted_answers_of_the_policy(tmp_path):
    cfg = resolve_config(config_utils.load_config("configs/rft_synthetic.py"),
                         [("rft.prompts_per_step", "16"), ("rft.samples_per_prompt", "2")])
    run = Run.build(cfg, str(tmp_path), name="rft")
    train, _ = ftdata.make_splits("add", 400, 0, 0.2)
    answer_of = {ex["prompt"]: ex["answer"] for ex in train}
    sampler = RejectionSampler(run, train, cfg.rft)
    batch = sampler.next_batch(0, run.starting_params())
    tok = run.tokenizer
    rows = [i for i in range(len(batch["inputs"])) if batch["loss_mask"][i].sum() > 0]
    # One row per prompt with an accepted sample (max_per_prompt=1) of its 2 samples: between
    # half the accepted samples and all of them, and at most one per prompt.
    n_accepted = round(sampler.accepted[0] * 32)
    assert 0 < len(rows) <= 16 and n_accepted / 2 <= len(rows) <= n_accepted
    for i in rows:
        ids = batch["inputs"][i][batch["segment_ids"][i] > 0].tolist()
        text = tok.decode([t for t in ids if t not in (tok.bos_id, tok.eos_id)])
        prompt, answer = text.split("\n", 1)
        assert answer_of[prompt] == answer.strip()  # the checker's verdict, re-derived
        # the loss is on the answer (and eos) only
        assert batch["loss_mask"][i].sum() == len(tok.encode(answer_of[prompt])) + 1
    # The same step draws the same samples (keys from the step): resumable.
    again = RejectionSampler(run, train, cfg.rft).next_batch(0, run.starting_params())
    np.testing.assert_array_equal(again["inputs"], batch["inputs"])


@pytest.mark.slow
def test_training_on_its_own_correct_answers_raises_acceptance(tmp_path):
    s = main(["--config", "configs/rft_synthetic.py:steps=30", "--workdir", str(tmp_path),
              "--config.train.progress=False", "--config.train.tensorboard=False",
              "--config.data.eval_examples=64", "--config.train.eval_every=30"])
    acc = s["acceptance"]
    assert len(acc) == 30
    assert np.mean(acc[-10:]) >= np.mean(acc[:10]), acc  # 0.77 -> 0.79 when written
    # greedy held-out exact match: 0.797 -> 0.906 when written
    assert s["exact_match_after"] >= s["exact_match_before"] + 0.05, s
