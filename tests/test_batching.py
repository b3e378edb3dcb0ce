"""Continuous batching: per-row KV cache offsets, the slot engine against `generate`, per-row
sampling, cancellation, the adapter bank, and the engine on a tensor-parallel mesh."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models
from ftjax.infer import generate as gen
from ftjax.infer.adapters import AdapterBank
from ftjax.infer.batching import (BatchEngine, Request, SamplingParams, _decode_jit,
                                  _prefill_jit)
from ftjax.peft.lora import LoRAWeight, apply_lora
from ftjax.peft.core import map_weights

# Large init_std: peaked logits, so greedy paths vary and are far from argmax ties.
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, init_std=0.5)
CFG = models.preset("llama", **TINY)
EOS = 1


def _prompts(n: int, seed: int = 1, lo: int = 1, hi: int = 12) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, TINY["vocab_size"], size=int(rng.integers(lo, hi))).tolist()
            for _ in range(n)]


def _reference(params, cfg, prompts, new, apply_fn=None):
    """`generate` on all prompts at once (left-padded), cut after the first eos."""
    width = max(len(p) for p in prompts)
    toks = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        toks[i, width - len(p):] = p
    out = gen.generate(params, cfg, toks, np.array([len(p) for p in prompts]),
                       max_new_tokens=new, eos_id=EOS, apply_fn=apply_fn)
    res = []
    for row in out.tolist():
        res.append(row[:row.index(EOS) + 1] if EOS in row else row)
    return res


class Collector:
    def __init__(self):
        self.out, self.reason = {}, {}

    def __call__(self, i):
        def cb(new, reason):
            self.out.setdefault(i, []).extend(new)
            if reason is not None:
                self.reason[i] = reason
            return True
        return cb


def _run(engine, prompts, sampling, adapters=None):
    col = Collector()
    for i, p in enumerate(prompts):
        engine.submit(Request(p, sampling if isinstance(sampling, SamplingParams) else
                              sampling[i], col(i),
                              adapter=-1 if adapters is None else adapters[i]))
    engine.run_until_idle()
    return [col.out[i] for i in range(len(prompts))], col.reason


@pytest.fixture(scope="module")
def params():
    return models.init(CFG, jax.random.PRNGKey(0))


def test_per_row_cache_offsets_equal_separate_runs(params):
    """Two rows decoding at different cache offsets (per-row index) give the logits each row
    gets alone with a scalar index."""
    a, b = [5, 9, 11, 3, 7], [8, 2, 30]
    cache = models.init_cache(CFG, 2, 16, per_row=True)
    toks = np.zeros((2, 5), np.int32)
    toks[0], toks[1, :3] = a, b
    seg = np.array([[1] * 5, [1, 1, 1, 0, 0]], np.int32)
    _, aux = models.apply(params, CFG, jnp.asarray(toks), segment_ids=jnp.asarray(seg),
                          cache=cache)
    c = {**aux["cache"], "index": jnp.array([5, 3], jnp.int32)}
    logits, _ = models.apply(params, CFG, jnp.array([[4], [6]], jnp.int32), cache=c)
    for row, (prompt, nxt) in enumerate([(a, 4), (b, 6)]):
        alone = models.init_cache(CFG, 1, 16)
        _, aux1 = models.apply(params, CFG, jnp.array([prompt], jnp.int32), cache=alone)
        want, _ = models.apply(params, CFG, jnp.array([[nxt]], jnp.int32), cache=aux1["cache"])
        np.testing.assert_allclose(logits[row], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slots,chunk", [(3, 1), (4, 4), (16, 3)])
def test_greedy_equals_generate_as_requests_join_and_leave(params, slots, chunk):
    prompts = _prompts(10)
    want = _reference(params, CFG, prompts, 12)
    engine = BatchEngine(params, CFG, eos_ids=[EOS], slots=slots, max_len=32, chunk=chunk)
    got, reasons = _run(engine, prompts, SamplingParams(max_tokens=12))
    assert got == want
    assert all(reasons[i] == ("stop" if got[i][-1] == EOS else "length")
               for i in range(len(prompts)))
    assert engine.stats["prefills"] == 10 and engine.active() == 0


def test_sampling_is_per_request_and_reproducible(params):
    """A request's sampled tokens depend on its seed only, not on its batch neighbours."""
    prompts = _prompts(6, seed=3)
    sp = [SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=100 + i)
          for i in range(6)]
    together, _ = _run(BatchEngine(params, CFG, eos_ids=[EOS], slots=6, max_len=32), prompts,
                       sp)
    alone = [_run(BatchEngine(params, CFG, eos_ids=[EOS], slots=2, max_len=32), [p], [s])[0][0]
             for p, s in zip(prompts, sp)]
    assert together == alone
    other_seed, _ = _run(BatchEngine(params, CFG, eos_ids=[EOS], slots=6, max_len=32),
                         prompts, [SamplingParams(max_tokens=10, temperature=1.0, seed=7 + i)
                                   for i in range(6)])
    assert other_seed != together
    greedy_rows = _reference(params, CFG, prompts[:2], 10)
    mixed, _ = _run(BatchEngine(params, CFG, eos_ids=[EOS], slots=4, max_len=32), prompts[:2],
                    [SamplingParams(max_tokens=10), sp[1]])
    assert mixed[0] == greedy_rows[0]          # a greedy row beside a sampled one


def test_max_tokens_cancel_and_bad_requests(params):
    engine = BatchEngine(params, CFG, eos_ids=[EOS], slots=2, max_len=16)
    with pytest.raises(ValueError, match="context is 16 tokens"):
        engine.submit(Request([3] * 10, SamplingParams(max_tokens=7), lambda *a: True))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit(Request([3], SamplingParams(top_p=0.0), lambda *a: True))
    with pytest.raises(ValueError, match="no tokens"):
        engine.check(0, SamplingParams())
    col = Collector()
    stopper = {"n": 0}

    def stop_after_two(new, reason):
        stopper["n"] += len(new)
        stopper["reason"] = reason
        return stopper["n"] < 2
    engine.submit(Request([5, 6], SamplingParams(max_tokens=10), stop_after_two))
    r = engine.submit(Request([7], SamplingParams(max_tokens=10), col(0)))
    engine.cancel(r)
    engine.submit(Request([9, 9, 9], SamplingParams(max_tokens=3), col(1)))
    engine.run_until_idle()
    assert stopper["reason"] == "cancelled"
    assert col.reason[0] == "cancelled" and col.out.get(0, []) == []
    assert col.reason[1] in ("length", "stop") and len(col.out[1]) <= 3
    assert engine.active() == 0 and engine.queued() == 0


def _lora(params, seed):
    """A LoRA tree with non-zero random b (so it changes the outputs)."""
    tree = apply_lora(params, jax.random.PRNGKey(seed), rank=2 + seed, alpha=4.0)
    key = jax.random.PRNGKey(100 + seed)

    def fill(path, w):
        if not isinstance(w, LoRAWeight):
            return w
        return w.replace(b=0.3 * jax.random.normal(jax.random.fold_in(key, hash(path) % 997),
                                                   w.b.shape))
    return map_weights(fill, tree)


def test_adapter_bank_rows_equal_single_adapter_models(params):
    """Rows of one batch using different adapters (and the base) equal each adapter alone;
    adding an adapter later changes no shape, so nothing recompiles."""
    l1, l2 = _lora(params, 1), _lora(params, 2)
    bank = AdapterBank(params, capacity=3, max_rank=4)
    i1 = bank.add("one", l1)
    prompts = _prompts(6, seed=5)
    ids = [i1, -1, i1, -1, i1, -1]
    engine = BatchEngine(bank.params, CFG, eos_ids=[EOS], slots=6, max_len=32, adapters=bank)
    got, _ = _run(engine, prompts, SamplingParams(max_tokens=10), ids)
    compiled = _decode_jit._cache_size()
    i2 = bank.add("two", l2)
    engine.set_params(bank.params)
    ids2 = [i1, i2, -1, i2, i1, -1]
    got2, _ = _run(engine, prompts, SamplingParams(max_tokens=10), ids2)
    assert _decode_jit._cache_size() == compiled
    refs = {i1: _reference(l1, CFG, prompts, 10), i2: _reference(l2, CFG, prompts, 10),
            -1: _reference(params, CFG, prompts, 10)}
    assert refs[i1] != refs[-1] and refs[i2] != refs[-1]
    for k in range(6):
        assert got[k] == refs[ids[k]][k]
        assert got2[k] == refs[ids2[k]][k]
    bank.remove("one")
    with pytest.raises(KeyError, match="no adapter named 'one'"):
        bank.index("one")
    assert bank.add("three", l1, busy=[i1]) != i1     # a busy index is not reused
    with pytest.raises(ValueError, match="rank 5 > max_rank 4"):
        AdapterBank(params, capacity=1, max_rank=4).add("big", apply_lora(
            params, jax.random.PRNGKey(0), rank=5))
    assert bank.add("four", l2) == i1                 # free once no request uses it
    with pytest.raises(ValueError, match="bank is full"):
        bank.add("five", l2)


def test_engine_on_a_tensor_parallel_mesh_equals_one_device(params):
    """Params sharded over heads / MLP on 8 devices (each holds 1/8 of every attention and
    MLP kernel), KV cache sharded over kv heads: the same tokens as on one device."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from ftjax.evaluate import _placement, mesh_sections
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    cfg = models.preset("llama", **{**TINY, "num_heads": 8, "num_kv_heads": 8,
                                    "hidden_size": 64, "intermediate_size": 128})
    p1 = models.init(cfg, jax.random.PRNGKey(1))
    pl = _placement(mesh_sections(data=1, tensor=8, rules="tp"), cfg, p1)
    placed = pl.put_params(p1)
    q = placed["layers"]["attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape[-1] == q.shape[-1] // 8
    prompts = _prompts(5, seed=9)
    sp = [SamplingParams(max_tokens=8, temperature=0.0 if i % 2 else 0.8, seed=i)
          for i in range(5)]
    one, _ = _run(BatchEngine(p1, cfg, eos_ids=[EOS], slots=4, max_len=32), prompts, sp)
    cache_sh = NamedSharding(pl.mesh, P(None, None, None, "tensor", None))
    many, _ = _run(BatchEngine(placed, cfg, eos_ids=[EOS], slots=4, max_len=32,
                               cache_sharding=cache_sh), prompts, sp)
    assert many == one


def test_generate_script_on_a_tensor_parallel_mesh_equals_one_device():
    """scripts/generate.py --mesh tensor=4: the quickstart base sharded over 4 devices gives
    the completions of one device."""
    import os
    import sys
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py sets 8 fake CPU devices)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "scripts"))
    import generate as script
    base = os.path.join(root, "experiments", "quickstart_base", "model.safetensors")
    argv = ["--model", base, "--prompt", "add 12 34", "--prompt", "reverse hello",
            "--prompt", "sort 5 1 3", "--max-new-tokens", "16"]
    cfg, params, _ = script.load_model_and_tokenizer(base)
    placed = script.place_on_mesh(cfg, params, "tensor=4", "vocab=none")
    q = placed["layers"]["mlp"]["up_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape[-1] == q.shape[-1] // 4
    assert script.main(argv + ["--mesh", "tensor=4", "--rule-overrides", "vocab=none"]) == \
        script.main(argv)


def test_a_failing_callback_or_step_ends_requests_not_the_engine(params):
    """A callback that raises ends its own request; a decode step that fails ends the running
    and queued requests with "error"; the engine thread keeps serving."""
    import threading
    engine = BatchEngine(params, CFG, eos_ids=[EOS], slots=2, max_len=32)
    engine.start()
    try:
        done = {}
        events = {k: threading.Event() for k in ("bad", "good", "after")}

        def cb(name, fail=False):
            def f(new, reason):
                if fail and new:
                    raise RuntimeError("callback bug")
                if reason is not None:
                    done[name] = reason
                    events[name].set()
                return True
            return f
        engine.submit(Request([5, 6, 7], SamplingParams(max_tokens=6), cb("bad", fail=True)))
        engine.submit(Request([8, 9], SamplingParams(max_tokens=6), cb("good")))
        assert events["good"].wait(60) and done["good"] in ("stop", "length")
        original = engine._decode
        engine._decode = lambda: (_ for _ in ()).throw(RuntimeError("device lost"))
        engine.submit(Request([3, 4], SamplingParams(max_tokens=6), cb("after")))
        assert events["after"].wait(60) and done["after"] == "error"
        assert "device lost" in engine.last_error
        engine._decode = original
        events["after"].clear()
        engine.submit(Request([3, 4], SamplingParams(max_tokens=6), cb("after")))
        assert events["after"].wait(60) and done["after"] in ("stop", "length")
    finally:
        engine.stop()


def test_warmup_compiles_every_decode_program(params):
    """Decoding runs on the smallest power-of-two prefix of slots that covers the active ones;
    warmup() compiles all of them, so no load compiles a decode program later."""
    engine = BatchEngine(params, CFG, eos_ids=[EOS], slots=8, max_len=32, chunk=2)
    engine.warmup()
    compiled = _decode_jit._cache_size(), _prefill_jit._cache_size()
    prompts = _prompts(11, seed=4)
    got, _ = _run(engine, prompts[:1], SamplingParams(max_tokens=6))       # 1 row
    got += _run(engine, prompts[1:], SamplingParams(max_tokens=6))[0]      # up to 8 rows
    assert (_decode_jit._cache_size(), _prefill_jit._cache_size()) == compiled
    assert got == _reference(params, CFG, prompts, 6)
