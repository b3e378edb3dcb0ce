"""The evaluation stage: parity of log-likelihoods and perplexity with transformers, lm-eval's
acc / acc_norm, sharded (8 devices) == 1 device, task files, the CLI and training-time tasks.

One tiny random Llama saved as a transformers directory (no tokenizer files: the character
tokenizer is used) serves every test; the tasks are small JSONL files written here.
"""
import json
import os

import jax
import numpy as np
import pytest

from ftjax.data import CharTokenizer
from ftjax.eval import metrics as M
from ftjax.eval.evaluate import evaluate, load_tasks
from ftjax.evaluate import engine_for, load_model, mesh_sections
from ftjax.eval.tasks import encode_pair, load_task, parse_task_spec, rolling_windows

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_POS = 48


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=MAX_POS,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # a less flat distribution than the default init, so choices differ
        for p in model.parameters():
            p.mul_(4.0)
    d = tmp_path_factory.mktemp("hf") / "tiny"
    model.save_pretrained(d)
    return str(d), model


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "a bird", "the sun", "moon", "tree", "river", "stone", "x", "blue sky"]
    mc = []
    for i in range(24):
        choices = [str(c) for c in rng.choice(words, size=4, replace=False)]
        mc.append({"context": f"q{i}: which one is {words[i % 10]}?", "choices": choices,
                   "answer": int(rng.integers(4))})
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    texts = [{"text": " ".join(rng.choice(words, size=int(rng.integers(3, 30))))}
             for _ in range(6)]
    (d / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))
    gen = [{"prompt": f"add {a}+{b}\n", "answer": str(a + b)}
           for a, b in rng.integers(0, 50, size=(10, 2))]
    (d / "gen.jsonl").write_text(
        json.dumps({"ftjax_task": {"max_new_tokens": 6, "metrics": ["exact_match", "token_f1",
                                                                     "rouge_l", "bleu"]}})
        + "\n" + "".join(json.dumps(r) + "\n" for r in gen))
    return d


def torch_logps(model, ids):
    """Per-token log-probs of ids[1:] given the prefix, by transformers."""
    with torch.no_grad():
        out = model(torch.tensor([ids[:-1]])).logits[0].double()
    lp = torch.log_softmax(out, -1)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def test_multiple_choice_loglik_equals_transformers(hf_dir, task_files):
    path, model = hf_dir
    m = load_model(path, devices=jax.devices()[:1])
    assert isinstance(m.tokenizer, CharTokenizer)
    spec, recs = load_task(str(task_files / "mc.jsonl"))
    assert spec.kind == "multiple_choice"
    results, samples = evaluate(engine_for(m, batch_size=8), [(spec, recs)])
    accs, norms = [], []
    for rec, s in zip(recs, samples["mc"]):
        ref = []
        for c in rec["choices"]:
            ctx, cont = encode_pair(m.tokenizer, rec["context"], " " + c)
            lp = torch_logps(model, ctx + cont)
            ref.append(lp[len(ctx) - 1:].sum())
        np.testing.assert_allclose(s["lls"], ref, rtol=1e-4, atol=1e-4)
        # lm-evaluation-harness: argmax of lls, and of lls / len(choice) (characters).
        gold = rec["answer"]
        accs.append(float(np.argmax(ref) == gold))
        norms.append(float(np.argmax(np.array(ref) / [len(c) for c in rec["choices"]]) == gold))
    r = results["mc"]["metrics"]
    assert r["acc"] == pytest.approx(np.mean(accs))
    assert r["acc_norm"] == pytest.approx(np.mean(norms))


def test_perplexity_equals_transformers(hf_dir, task_files):
    """Documents shorter than the window: exp(mean NLL) with transformers' own loss; longer
    ones: every token predicted once, and the same numbers on 8 devices."""
    path, model = hf_dir
    m = load_model(path, devices=jax.devices()[:1])
    spec, recs = load_task(str(task_files / "text.jsonl"))
    short = [r for r in recs if len(r["text"]) + 1 <= MAX_POS]
    assert short and len(short) < len(recs)   # both kinds present
    spec_s = type(spec)(name="short", kind="perplexity", path=spec.path, options=spec.options)
    res, _ = evaluate(engine_for(m, batch_size=8), [(spec_s, short)])
    nll, n = 0.0, 0
    for r in short:
        ids = [1] + m.tokenizer.encode(r["text"])
        with torch.no_grad():
            out = model(torch.tensor([ids]), labels=torch.tensor([ids]))
        nll += float(out.loss) * (len(ids) - 1)
        n += len(ids) - 1
    assert res["short"]["metrics"]["token_perplexity"] == pytest.approx(np.exp(nll / n),
                                                                        rel=1e-4)
    assert res["short"]["metrics"]["tokens"] == n
    # Long documents: windows of 16 tokens, and each token's log-prob with its window's
    # context equals transformers' on that same context.
    ids = m.tokenizer.encode(recs[int(np.argmax([len(r["text"]) for r in recs]))]["text"])
    wins = rolling_windows(ids, [1], 16, 16)
    assert [t for _, cont in wins for t in cont] == ids
    e = engine_for(m, batch_size=8)
    got = e.loglik(wins)
    for (ctx, cont), g in zip(wins, got):
        row = (ctx + cont)[-17:]
        ref = torch_logps(model, row)[-len(cont):]
        np.testing.assert_allclose(g.token_logps, ref, atol=1e-4)


def test_rolling_windows_cover_each_token_once():
    ids = list(range(10, 47))
    for max_len, stride in [(8, 8), (8, 3), (5, 1), (64, 64)]:
        wins = rolling_windows(ids, [1], max_len, stride)
        assert [t for _, c in wins for t in c] == ids
        assert all(len(c) + len(x) <= max_len + 1 for x, c in wins)
        # Each window after the first sees max_len - stride tokens of context (or all).
        for x, c in wins[1:]:
            assert len(x) + len(c) == max_len + 1 or x[0] == ids[0]


def test_sharded_equals_one_device(hf_dir, task_files):
    path, _ = hf_dir
    tasks = load_tasks([str(task_files / "mc.jsonl"), str(task_files / "gen.jsonl"),
                        str(task_files / "text.jsonl") + ":max_len=16"])
    one = load_model(path, devices=jax.devices()[:1])
    eight = load_model(path, layout=mesh_sections(data=2, fsdp=2, tensor=2))
    assert eight.placement.mesh.size == 8
    q = eight.params["layers"]["attn"]["q_proj"]["kernel"]
    assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
    r1, s1 = evaluate(engine_for(one, batch_size=8), tasks)
    r8, s8 = evaluate(engine_for(eight, batch_size=8), tasks)
    for t in r1:
        for k, v in r1[t]["metrics"].items():
            assert r8[t]["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), (t, k)
    assert [s["completion"] for s in s1["gen"]] == [s["completion"] for s in s8["gen"]]


def test_generation_matches_greedy_transformers(hf_dir, task_files):
    path, model = hf_dir
    m = load_model(path, devices=jax.devices()[:1])
    spec, recs = load_task(str(task_files / "gen.jsonl"))
    _, samples = evaluate(engine_for(m, batch_size=8), [(spec, recs)])
    for rec, s in zip(recs[:4], samples["gen"][:4]):
        ids = [1] + m.tokenizer.encode(rec["prompt"])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                 eos_token_id=2, pad_token_id=0)
        new = out[0, len(ids):].tolist()
        assert s["completion"] == m.tokenizer.decode(new)


def test_engine_buckets_compile_few_shapes(hf_dir):
    path, _ = hf_dir
    m = load_model(path, devices=jax.devices()[:1])
    from ftjax.eval import engine as engine_mod
    engine_mod._COMPILED.clear()
    e = engine_for(m, batch_size=4)
    reqs = [([1] + [5] * n, [7, 8]) for n in range(1, 40)]   # rows of 3..41 tokens
    out = e.loglik(reqs)
    assert [r.n_tokens for r in out] == [2] * 39
    # 10 batches of 4 rows sorted by length; each padded to its longest row's bucket (a power
    # of two, at most the model's 48 positions): 48, 48, 48, 32 x4, 16 x2, 8 -> 4 programs.
    assert e._loglik._cache_size() == 4


def test_generation_metrics_and_pass_at_k(hf_dir, tmp_path):
    """A generation task whose answer is what the model says greedily: exact match 1; with
    samples, pass@k follows the per-example correct counts."""
    path, _ = hf_dir
    m = load_model(path, devices=jax.devices()[:1])
    e = engine_for(m, batch_size=8)
    prompts = ["add 1+2\n", "add 3+4\n", "sort abc\n"]
    ids = [[1] + m.tokenizer.encode(p) for p in prompts]
    greedy = [m.tokenizer.decode(list(g.ids)) for g in e.generate(ids, max_new_tokens=5)]
    f = tmp_path / "own.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                         for p, a in zip(prompts, greedy)))
    spec, recs = load_task(str(f), {"max_new_tokens": 5})
    res, _ = evaluate(e, [(spec, recs)])
    assert res["own"]["metrics"]["exact_match"] == 1.0
    assert res["own"]["metrics"]["token_f1"] == 1.0
    spec, recs = load_task(str(f), {"max_new_tokens": 5, "num_samples": 4, "temperature": 1.5,
                                    "pass_k": [1, 4], "seed": 3, "name": "sampled"})
    res, smp = evaluate(e, [(spec, recs)])
    counts = [s["correct_samples"] for s in smp["sampled"]]
    assert res["sampled"]["metrics"]["pass@4"] == pytest.approx(
        np.mean([M.pass_at_k(4, c, 4) for c in counts]))
    assert res["sampled"]["metrics"]["pass@1"] == pytest.approx(np.mean(counts) / 4)


def test_fewshot_is_seeded_and_excludes_the_record(task_files):
    from ftjax.eval.tasks import fewshot_prefix
    spec, recs = load_task(str(task_files / "mc.jsonl"), {"num_fewshot": 3})
    a = [fewshot_prefix(spec.options, recs, i, None) for i in range(len(recs))]
    b = [fewshot_prefix(spec.options, recs, i, None) for i in range(len(recs))]
    assert a == b and len(set(a)) > 1
    for i, p in enumerate(a):
        assert recs[i]["context"] not in p
        assert p.count("\n\n") == 3


def test_task_spec_and_bad_files(tmp_path, task_files):
    path, opts = parse_task_spec("x/gen.jsonl:extract='regex:(\\d+), ok',stop=['\\n'],"
                                 "max_new_tokens=8")
    assert path == "x/gen.jsonl"
    assert opts == {"extract": "regex:(\\d+), ok", "stop": ["\n"], "max_new_tokens": 8}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x", "y"], "answer": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 1.*answer"):
        load_task(str(bad))
    bad.write_text('{"context": "a", "choices": ["x", "y"], "answer": 0}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: malformed JSON"):
        load_task(str(bad))
    with pytest.raises(ValueError, match="unknown option.*num_shots"):
        load_task(str(task_files / "mc.jsonl"), {"num_shots": 2})
    with pytest.raises(ValueError, match="needs temperature > 0"):
        load_task(str(task_files / "gen.jsonl"), {"num_samples": 4})
    with pytest.raises(ValueError, match="tasks named more than once"):
        load_tasks([str(task_files / "mc.jsonl"), str(task_files / "mc.jsonl")])


def test_cli_on_hf_dir_writes_results(hf_dir, task_files, tmp_path, capsys):
    from ftjax.cli import run_main
    from ftjax.evaluate import main
    path, _ = hf_dir
    out = tmp_path / "out"
    main(["--model", path, "--tasks",
          f"{task_files / 'mc.jsonl'},{task_files / 'gen.jsonl'}:max_new_tokens=4",
          "--out", str(out), "--limit", "5"])
    res = json.loads((out / "eval_results.json").read_text())
    assert set(res["tasks"]) == {"mc", "gen"} and res["tasks"]["mc"]["n"] == 5
    assert res["model"]["kind"] == "hf"
    md = (out / "eval_results.md").read_text()
    assert "| mc | multiple_choice | acc |" in md
    assert len((out / "samples_gen.jsonl").read_text().splitlines()) == 5
    # A missing task file: one line naming it, exit code 2, before the model is loaded.
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(["--model", path, "--tasks", str(tmp_path / "missing.jsonl")]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "missing.jsonl" in err and "Traceback" not in err
