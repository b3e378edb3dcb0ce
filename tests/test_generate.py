"""KV-cache generation matches a cache-free reference; sampling filters; eval harness counts."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models
from ftjax.data.tokenizer import CharTokenizer
from ftjax.eval.harness import exact_match_eval, loglik_eval
from ftjax.infer import generate as gen

# init_std is large so the tiny random models have peaked logits: greedy paths then vary and
# are far from argmax ties, which makes exact token equality a meaningful assertion.
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, init_std=0.5)
CONFIGS = {
    "llama": models.preset("llama", **TINY),
    "gpt2": models.preset("gpt2", **TINY, max_position_embeddings=64),
    "mistral": models.preset("mistral", **TINY, sliding_window=4),
}
NEW = 12


def _params(cfg, seed=0):
    return models.init(cfg, jax.random.PRNGKey(seed))


def _left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


def _prompts(vocab: int, lengths=(3, 9, 1, 6), seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


_apply = jax.jit(models.apply, static_argnames=("cfg",))


def naive_greedy(params, cfg, tokens, lengths, max_new_tokens, eos_id, pad_id=0) -> np.ndarray:
    """Greedy decoding that recomputes the full forward pass (no cache) at every step.

    The growing sequence lives in a fixed [B, P + max_new_tokens] buffer whose not-yet-generated
    tail is padding (segment 0): causal attention makes the logits at the last real slot equal to
    those of the unpadded sequence, and one fixed shape keeps the test to one compilation.
    """
    b, p = tokens.shape
    total = p + max_new_tokens
    seq = np.full((b, total), pad_id, np.int32)
    seq[:, :p] = tokens
    seg = np.zeros((b, total), np.int32)
    seg[:, :p] = np.arange(p)[None] >= (p - lengths)[:, None]
    pos = np.zeros((b, total), np.int32)
    pos[:, :p] = np.maximum(np.arange(p)[None] - (p - lengths)[:, None], 0) * seg[:, :p]
    out = np.full((b, max_new_tokens), pad_id, np.int32)
    done = np.zeros(b, bool)
    for i in range(max_new_tokens):
        logits, _ = _apply(params, cfg, jnp.asarray(seq), positions=jnp.asarray(pos),
                           segment_ids=jnp.asarray(seg))
        tok = np.asarray(jnp.argmax(logits[:, p + i - 1], axis=-1)).astype(np.int32)
        out[:, i] = np.where(done, pad_id, tok)
        done |= tok == eos_id
        seq[:, p + i], seg[:, p + i], pos[:, p + i] = tok, 1, lengths + i
    return out


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_cached_greedy_matches_naive(family):
    cfg = CONFIGS[family]
    params = _params(cfg)
    tokens, lengths = _left_pad(_prompts(cfg.vocab_size))

    # First without eos (-1 is never emitted), to compare the full continuation ...
    ref = naive_greedy(params, cfg, tokens, lengths, NEW, eos_id=-1)
    out = gen.generate(params, cfg, tokens, lengths, max_new_tokens=NEW, eos_id=-1)
    assert out.shape == (len(lengths), NEW) and out.dtype == np.int32
    np.testing.assert_array_equal(out, ref)
    assert len(np.unique(ref)) > 3, "degenerate test model: greedy output barely varies"

    # ... then with an eos that row 0 emits mid-way, so pad-after-eos is exercised too.
    eos = int(ref[0, 4])
    ref_eos = naive_greedy(params, cfg, tokens, lengths, NEW, eos_id=eos)
    out_eos = gen.generate(params, cfg, tokens, lengths, max_new_tokens=NEW, eos_id=eos, pad_id=0)
    np.testing.assert_array_equal(out_eos, ref_eos)
    first_eos = int(np.argmax(ref[0] == eos))
    assert (out_eos[0, first_eos + 1:] == 0).all() and out_eos[0, first_eos] == eos


def test_sliding_window_matters():
    """Sanity check that the mistral case tests a window: it differs from full attention."""
    cfg = CONFIGS["mistral"]
    params = _params(cfg)
    tokens, lengths = _left_pad(_prompts(cfg.vocab_size))
    windowed = gen.generate(params, cfg, tokens, lengths, max_new_tokens=NEW, eos_id=-1)
    full = gen.generate(params, cfg.replace(sliding_window=None), tokens, lengths,
                        max_new_tokens=NEW, eos_id=-1)
    assert (windowed != full).any()


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_left_padding_does_not_change_output(family):
    cfg = CONFIGS[family]
    params = _params(cfg)
    short, long = _prompts(cfg.vocab_size, lengths=(4, 11), seed=3)
    alone = gen.generate(params, cfg, *_left_pad([short]), max_new_tokens=NEW, eos_id=-1)
    batch = gen.generate(params, cfg, *_left_pad([long, short]), max_new_tokens=NEW, eos_id=-1)
    np.testing.assert_array_equal(batch[1], alone[0])
    # Extra left padding beyond the longest prompt changes nothing either.
    tokens, lengths = _left_pad([short])
    padded = np.concatenate([np.zeros((1, 7), np.int32), tokens], axis=1)
    wide = gen.generate(params, cfg, padded, lengths, max_new_tokens=NEW, eos_id=-1)
    np.testing.assert_array_equal(wide, alone)


def test_sampling_top_k_1_is_greedy_and_rng_is_deterministic():
    cfg = CONFIGS["llama"]
    params = _params(cfg)
    tokens, lengths = _left_pad(_prompts(cfg.vocab_size))
    kw = dict(max_new_tokens=NEW, eos_id=-1)
    greedy = gen.generate(params, cfg, tokens, lengths, **kw)
    top1 = gen.generate(params, cfg, tokens, lengths, temperature=0.8, top_k=1,
                        rng=jax.random.PRNGKey(5), **kw)
    np.testing.assert_array_equal(top1, greedy)
    tiny_p = gen.generate(params, cfg, tokens, lengths, temperature=1.0, top_p=1e-6,
                          rng=jax.random.PRNGKey(5), **kw)
    np.testing.assert_array_equal(tiny_p, greedy)

    hot = dict(temperature=3.0, top_k=0, top_p=1.0)
    a = gen.generate(params, cfg, tokens, lengths, rng=jax.random.PRNGKey(7), **hot, **kw)
    b = gen.generate(params, cfg, tokens, lengths, rng=jax.random.PRNGKey(7), **hot, **kw)
    c = gen.generate(params, cfg, tokens, lengths, rng=jax.random.PRNGKey(8), **hot, **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()

    with pytest.raises(ValueError, match="rng"):
        gen.generate(params, cfg, tokens, lengths, temperature=1.0, **kw)


def test_sample_logits_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    rngs = jax.random.PRNGKey(0)

    def draw(k, p):
        return np.asarray(gen.sample_logits(logits, rngs, jnp.float32(1.0), jnp.int32(k),
                                            jnp.float32(p)))

    assert set(draw(0, 1.0)) == {0, 1, 2, 3}
    assert set(draw(2, 1.0)) == {0, 1}
    assert set(draw(0, 0.7)) == {0, 1}        # 0.5 < 0.7 <= 0.8: the nucleus is {0, 1}
    assert set(draw(0, 0.85)) == {0, 1, 2}
    assert set(draw(3, 0.45)) == {0}           # token 0 alone already holds 0.5 >= 0.45
    frac0 = (draw(2, 1.0) == 0).mean()        # renormalised: 0.5 / 0.8
    assert abs(frac0 - 0.625) < 0.05


def test_generate_compiles_once_per_shape():
    cfg = CONFIGS["llama"]
    params = _params(cfg)
    tokens, lengths = _left_pad(_prompts(cfg.vocab_size))
    kw = dict(max_new_tokens=NEW, rng=jax.random.PRNGKey(0))
    gen.generate(params, cfg, tokens, lengths, eos_id=2, temperature=0.5, **kw)
    before = gen._generate_jit._cache_size()
    other = np.roll(tokens, 1, axis=0)
    gen.generate(params, cfg, other, np.roll(lengths, 1), eos_id=5, pad_id=1, temperature=1.3,
                 top_k=5, top_p=0.9, **kw)
    assert gen._generate_jit._cache_size() == before


# --- text generation and the eval harness ------------------------------------------------

TOK = CharTokenizer()
TEXT_CFG = models.preset("llama", **{**TINY, "vocab_size": TOK.vocab_size})
TEXT_PROMPTS = ["add 12 30", "reverse hello", "upper abc", "sort 3 1 2", "swap abcdef",
                "double 7", "lookup x", "caesar abc"]


def test_generate_text_matches_generate_and_batching():
    params = _params(TEXT_CFG)
    texts = gen.generate_text(params, TEXT_CFG, TOK, TEXT_PROMPTS, max_new_tokens=NEW)
    assert len(texts) == len(TEXT_PROMPTS)
    # Same result in several batches (the last one padded with filler rows).
    assert gen.generate_text(params, TEXT_CFG, TOK, TEXT_PROMPTS, max_new_tokens=NEW,
                             batch_size=3) == texts
    # Same result as `generate` on the training-format prompts, left-padded only to their max.
    encoded = [[TOK.bos_id] + TOK.encode(p + "\n") for p in TEXT_PROMPTS[:3]]
    out = gen.generate(params, TEXT_CFG, *_left_pad(encoded, TOK.pad_id), max_new_tokens=NEW,
                       eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    assert [TOK.decode(row.tolist()) for row in out] == texts[:3]


def test_exact_match_eval_counts():
    params = _params(TEXT_CFG)
    preds = gen.generate_text(params, TEXT_CFG, TOK, TEXT_PROMPTS, max_new_tokens=NEW)
    examples = []
    for i, (prompt, pred) in enumerate(zip(TEXT_PROMPTS, preds)):
        answer = f"  {pred}\n" if i % 2 == 0 else pred + "#wrong"   # strip() makes the former match
        examples.append({"prompt": prompt, "answer": answer})
    result = exact_match_eval(params, TEXT_CFG, TOK, examples, max_new_tokens=NEW, batch_size=4)
    assert result["n"] == len(examples)
    assert result["exact_match"] == pytest.approx(0.5)
    assert len(result["samples"]) == 5
    assert result["samples"][0] == (TEXT_PROMPTS[0], preds[0], examples[0]["answer"])

    with pytest.raises(ValueError, match="answer"):
        exact_match_eval(params, TEXT_CFG, TOK, [{"prompt": "x"}], max_new_tokens=2)


def test_loglik_eval_matches_manual_nll():
    cfg = CONFIGS["llama"]
    params = _params(cfg)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        seq = rng.integers(3, cfg.vocab_size, size=(3, 9))
        mask = (rng.random((3, 8)) < 0.6).astype(np.float32)
        batches.append({"inputs": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": mask,
                        "segment_ids": np.ones((3, 8), np.int32),
                        "positions": np.broadcast_to(np.arange(8), (3, 8))})
    nll, count = 0.0, 0.0
    for bt in batches:
        logits, _ = models.apply(params, cfg, jnp.asarray(bt["inputs"]))
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
        tgt = np.take_along_axis(logp, bt["targets"][..., None], axis=-1)[..., 0]
        nll -= (tgt * bt["loss_mask"]).sum()
        count += bt["loss_mask"].sum()
    result = loglik_eval(params, cfg, batches)
    assert result["tokens"] == int(count)
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_per_layer_decoding_equals_the_scan(family, monkeypatch):
    """Long generations decode with per-layer weights and caches (`models.unstack_layers`);
    the tokens equal those of the stacked, scanned layers (sliding window included)."""
    cfg = CONFIGS[family]
    params = _params(cfg)
    tokens, lengths = _left_pad(_prompts(cfg.vocab_size))
    kw = dict(max_new_tokens=40, eos_id=2, pad_id=0)
    monkeypatch.setattr(gen, "UNSTACK_MIN_NEW_TOKENS", 10 ** 6)
    scanned = gen.generate(params, cfg, tokens, lengths, **kw)
    monkeypatch.setattr(gen, "UNSTACK_MIN_NEW_TOKENS", 1)
    jax.clear_caches()   # the threshold is read when the decode function is traced
    per_layer = gen.generate(params, cfg, tokens, lengths, **kw)
    np.testing.assert_array_equal(per_layer, scanned)
    split, _ = models.unstack_layers(params, None, cfg)
    assert isinstance(split["layers"], list) and len(split["layers"]) == cfg.num_layers
