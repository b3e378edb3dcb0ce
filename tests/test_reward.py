"""Reward models: the scalar `score` head (`models.heads`), the transformers
`*ForSequenceClassification` directory it saves as and loads from (`io.hf.seqcls`), the
Bradley-Terry objective (`align.reward`) and the "reward" trainer.

Parity: transformers' `AutoModelForSequenceClassification` loads what ftjax saves and gives the
same scores (relative 1e-4) on right-padded rows, for a Llama-style and a GPT-2 model; the
directory loads back into equal params.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models
from ftjax.io.hf import seqcls
from ftjax.models import heads

PAD = 0
SIZE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
            num_kv_heads=2, max_position_embeddings=64)


def _rows(t=12):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 101, (3, t)).astype(np.int32)
    seg = np.ones((3, t), np.int32)
    seg[1, 7:] = 0     # right padding
    seg[2, 10:] = 0
    ids[seg == 0] = PAD
    return ids, seg


def _model(family, tie=False):
    kw = dict(SIZE)
    if family == "gpt2":
        kw["num_kv_heads"] = kw["num_heads"]
    cfg = models.preset(family, **kw, tie_embeddings=tie)
    params = models.init(cfg, jax.random.PRNGKey(3))
    params["score"] = heads.init_score(jax.random.PRNGKey(4), cfg.hidden_size, std=0.5)
    return cfg, params


@pytest.mark.parametrize("family,tie", [("llama", False), ("gpt2", True), ("qwen2", False)])
def test_saved_reward_model_scores_equal_transformers_and_load_back(tmp_path, family, tie):
    import torch
    import transformers as tf
    cfg, params = _model(family, tie)
    ids, seg = _rows()
    ours, _ = heads.sequence_scores(params, cfg, jnp.asarray(ids), jnp.asarray(seg))
    seqcls.save_reward_model(str(tmp_path), cfg, params, pad_token_id=PAD)
    hf = tf.AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert type(hf).__name__ == seqcls.seqcls_architecture(cfg)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(seg)).logits[:, 0].numpy()
    ours = np.asarray(ours)
    assert np.abs(ours).max() > 1e-2                 # a real score, not ~0
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    cfg2, params2, pad = seqcls.load_reward_model(str(tmp_path))
    assert pad == PAD and cfg2.tie_embeddings
    again, _ = heads.sequence_scores(jax.tree.map(jnp.asarray, params2), cfg2,
                                     jnp.asarray(ids), jnp.asarray(seg))
    np.testing.assert_allclose(np.asarray(again), ours, rtol=1e-5, atol=1e-6)


def test_sharded_reward_checkpoint_loads_in_transformers(tmp_path):
    import torch
    import transformers as tf
    cfg, params = _model("llama")
    seqcls.save_reward_model(str(tmp_path), cfg, params, pad_token_id=PAD)
    # the same model written in shards: the head goes into the last one, listed in the index
    import json
    d2 = tmp_path / "sharded"
    files = seqcls.save_reward_model(str(d2), cfg, params, pad_token_id=PAD, shard_size_mb=0.05)
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    index = json.loads((d2 / "model.safetensors.index.json").read_text())
    assert index["weight_map"][seqcls.SCORE_KEY] == shards[-1]
    ids, seg = _rows()
    outs = []
    for d in (tmp_path, d2):
        m = tf.AutoModelForSequenceClassification.from_pretrained(str(d)).eval()
        with torch.no_grad():
            outs.append(m(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(seg)).logits.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    _, p2, _ = seqcls.load_reward_model(str(d2))
    np.testing.assert_array_equal(p2["score"]["kernel"], np.asarray(params["score"]["kernel"]))


def test_load_refuses_a_causal_lm_and_many_labels(tmp_path):
    import json
    from ftjax.io import hf
    cfg, params = _model("llama")
    hf.save_pretrained(str(tmp_path / "lm"), cfg, {k: v for k, v in params.items()
                                                   if k != "score"})
    with pytest.raises(hf.HFCheckpointError, match="not a \\*ForSequenceClassification"):
        seqcls.load_reward_model(str(tmp_path / "lm"))
    seqcls.save_reward_model(str(tmp_path / "rm"), cfg, params, pad_token_id=PAD)
    c = json.loads((tmp_path / "rm" / "config.json").read_text())
    c["num_labels"] = 3
    (tmp_path / "rm" / "config.json").write_text(json.dumps(c))
    with pytest.raises(hf.HFCheckpointError, match="one label"):
        seqcls.load_reward_model(str(tmp_path / "rm"))


def test_last_token_and_token_scores():
    cfg, params = _model("llama")
    ids, seg = _rows()
    assert heads.last_token_index(jnp.asarray(seg)).tolist() == [11, 6, 9]
    per_tok, _ = heads.token_scores(params, cfg, jnp.asarray(ids), jnp.asarray(seg))
    seq, _ = heads.sequence_scores(params, cfg, jnp.asarray(ids), jnp.asarray(seg))
    np.testing.assert_allclose(np.asarray(seq), np.asarray(per_tok)[[0, 1, 2], [11, 6, 9]])


def _pair_batch(seed=0, b=4, t=12):
    rng = np.random.default_rng(seed)
    out = {}
    for h, cut in (("chosen", (12, 8, 5, 0)), ("rejected", (10, 12, 6, 0))):
        ids = rng.integers(1, 101, (b, t)).astype(np.int32)
        seg = (np.arange(t)[None] < np.asarray(cut)[:, None]).astype(np.int32)
        out[f"{h}_inputs"] = ids * seg
        out[f"{h}_segment_ids"] = seg
        out[f"{h}_positions"] = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    out["margin"] = np.array([[0.5], [0.0], [1.0], [3.0]], np.float32)
    return {k: jnp.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("center", [0.0, 0.01])
def test_reward_loss_is_bradley_terry_mean_over_real_pairs(center):
    from ftjax.align.reward import reward_loss
    cfg, params = _model("llama")
    batch = _pair_batch()
    obj, stats = reward_loss(cfg, center)(params, batch, None)
    rc, _ = heads.sequence_scores(params, cfg, batch["chosen_inputs"],
                                  batch["chosen_segment_ids"])
    rr, _ = heads.sequence_scores(params, cfg, batch["rejected_inputs"],
                                  batch["rejected_segment_ids"])
    rc, rr = np.asarray(rc, np.float64)[:3], np.asarray(rr, np.float64)[:3]  # row 3 is padding
    m = np.array([0.5, 0.0, 1.0])
    want = np.mean(np.log1p(np.exp(-(rc - rr - m)))) + center * np.mean((rc + rr) ** 2)
    assert float(stats["tokens"]) == 3
    np.testing.assert_allclose(float(obj) / 3, want, rtol=1e-5)
    assert float(stats["correct"]) == np.sum(rc > rr)
    np.testing.assert_allclose(float(stats["margin"]), np.sum(rc - rr), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chosen_inputs"):
        reward_loss(cfg)(params, {"inputs": batch["chosen_inputs"]}, None)


def test_score_head_gets_gradient_and_lora_trains_backbone_adapters():
    from ftjax.align.reward import reward_loss
    cfg, params = _model("llama")
    grads = jax.grad(lambda p: reward_loss(cfg)(p, _pair_batch(), None)[0])(params)
    assert float(jnp.abs(grads["score"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["layers"]["mlp"]["down_proj"]["kernel"]).max()) > 0


def test_reward_model_scores_pairs_as_trained_and_strings(tmp_path):
    from ftjax.data import CharTokenizer
    from ftjax.train.export import save_reward_model
    from ftjax.train.reward_model import RewardModel
    from ftjax.data.batching import encode_example
    tok = CharTokenizer()
    cfg, params = _model("llama")
    cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
    params = models.init(cfg, jax.random.PRNGKey(3))
    params["score"] = heads.init_score(jax.random.PRNGKey(4), cfg.hidden_size, std=0.5)
    save_reward_model(str(tmp_path), cfg, params, tok, "")
    rm = RewardModel.from_pretrained(str(tmp_path), batch_size=2)
    pairs = [("12+7=", "19"), ("3+4=", "8"), ("100+1=", "101")]
    got = rm.score(pairs)
    for (p, c), g in zip(pairs, got):       # the trainer's row layout, one at a time
        row = encode_example(tok, {"prompt": p, "answer": c}, 16)
        want, _ = heads.sequence_scores(params, cfg, jnp.asarray(row["inputs"])[None],
                                        jnp.asarray(row["segment_ids"])[None],
                                        jnp.asarray(row["positions"])[None])
        np.testing.assert_allclose(g, float(want[0]), rtol=1e-5, atol=1e-6)
    s = rm.score(["hello", "a longer string"])
    assert s.shape == (2,) and np.isfinite(s).all()
    with pytest.raises(ValueError, match="positions"):
        rm.score(["x" * 100])
    with pytest.raises(TypeError, match="pairs"):
        rm.score([1])


def test_reward_trainer_learns_and_exports(tmp_path):
    """A short run from the shipped quickstart base: held-out pairwise accuracy rises and
    the exported directory scores like the trained params in transformers."""
    import torch
    import transformers as tf
    from ftjax.main import main
    from ftjax.train.reward_model import RewardModel
    s = main(["--config", "configs/reward_synthetic.py:steps=60", "--workdir",
              str(tmp_path), "--config.train.progress=False", "--config.train.tensorboard=False",
              "--config.train.eval_every=60", "--config.data.n_per_task=400"])
    assert s["after"]["eval_accuracy"] >= s["before"]["eval_accuracy"] + 0.1, s
    assert s["after"]["eval_loss"] < s["before"]["eval_loss"]
    out = s["exported_hf_dir"]
    rm = RewardModel.from_pretrained(out)
    pairs = [("07/03/2021", "2021-03-07"), ("11/12/1999", "1999-12-11")]
    ours = rm.score(pairs)
    hf = tf.AutoModelForSequenceClassification.from_pretrained(out).eval()
    from ftjax.data.batching import encode_example
    rows = [encode_example(rm.tokenizer, {"prompt": p, "answer": c}, 32) for p, c in pairs]
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(np.stack([r["inputs"] for r in rows]),
                                           dtype=torch.long)).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_reward_trainer_on_a_preference_file_with_margins(tmp_path):
    """The data pipeline's preference records with a `margin` field train the reward model
    (the margin rides in the batch; `test_reward_loss_is_bradley_terry_mean_over_real_pairs`
    checks how the loss uses it)."""
    import json
    from ftjax.main import main
    src = [json.loads(line) for line in open("experiments/data_samples/preference.jsonl")]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(dict(r, margin=0.5)) + "\n" for r in src))
    s = main(["--config", f"configs/dpo_file.py:path={path}", "--workdir", str(tmp_path / "w"),
              "--config.trainer=reward", "--config.train.steps=30",
              "--config.train.eval_every=30", "--config.train.progress=False",
              "--config.train.tensorboard=False", "--config.optimizer.learning_rate=0.003"])
    assert s["data"]["source"] == "files"
    assert s["after"]["eval_accuracy"] > s["before"]["eval_accuracy"] + 0.1, s
