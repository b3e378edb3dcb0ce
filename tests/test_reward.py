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
    # the same model written in shards: the head goes to its own file, listed in the index
    d2 = tmp_path / "sharded"
    from ftjax.io.hf import save_pretrained  # noqa: F401  (shard size through save_reward_model)
    orig = seqcls.save_pretrained
    seqcls.save_pretrained = lambda *a, **k: orig(*a, **{**k, "shard_size_mb": 0.05})
    try:
        files = seqcls.save_reward_model(str(d2), cfg, params, pad_token_id=PAD)
    finally:
        seqcls.save_pretrained = orig
    assert "score.safetensors" in files and "model.safetensors.index.json" in files
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
