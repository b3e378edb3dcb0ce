"""Evaluation tasks read from JSONL files: what each kind of record means and how it is scored.

A task is a file plus options. The kind comes from the file's optional first line
`{"ftjax_task": {"kind": ..., <option>: <value>, ...}}` (defaults for that file), from
`kind=` in the spec, or from the first record's keys:

  multiple_choice  {"context": str, "choices": [str, ...], "answer": int | [int, ...]}
                   Each choice is scored as the continuation `target_delimiter + choice` of
                   the (few-shot) context; acc and acc_norm as lm-evaluation-harness defines
                   them (`ftjax.eval.metrics.multiple_choice`), and calibration (ECE) of the
                   softmax over the choices.
  perplexity       {"text": str}: rolling windows over the whole text (each token predicted
                   once, with `max_len` tokens of context at most), reported as token, word
                   and byte perplexity and bits per byte; or {"prompt": str, "completion": str}:
                   the perplexity of the completion given the prompt.
  generation       {"prompt": str, "answer": str | [str, ...]}: the model continues the
                   (few-shot) prompt, or with `chat=True` answers it as a user message through
                   its chat template; the text is cut at `stop` strings, the answer extracted
                   (`extract`), and scored by exact match, token F1, ROUGE-L, BLEU; with
                   `num_samples=n` and temperature > 0, pass@k for each k in `pass_k`. Mean and
                   min token log-probs of the generations measure the model's confidence.

Specs on the command line: `PATH` or `PATH:key=value,key=value` (values are Python literals
where they parse, else strings; quote values that hold commas), e.g.
`gen.jsonl:extract=last_number,max_new_tokens=16,stop=['\\n']`. See docs/evaluation.md.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import os
import random
import re
import time
from typing import Any, Optional, Sequence

import numpy as np

from ftjax.data.batching import bos_prefix
from ftjax.eval import metrics as M

__all__ = ["TaskSpec", "KINDS", "parse_task_spec", "load_task", "run_task", "task_from_dict"]

HEADER_KEY = "ftjax_task"

# Every option of each kind with its default; an unknown option is refused with these named.
KINDS: dict[str, dict[str, Any]] = {
    "multiple_choice": dict(
        num_fewshot=0,            # examples (context + delimiter + gold choice) before each
        fewshot_path="",          # JSONL to draw them from (default: the task's other records)
        fewshot_delimiter="\n\n",
        target_delimiter=" ",     # between context and choice (lm-evaluation-harness default)
        description="",           # text before the few-shot examples
        seed=1234,                # few-shot choice: a generator seeded by (seed, record index)
        limit=0,                  # score the first `limit` records (0 = all)
        ece_bins=10,
    ),
    "perplexity": dict(
        max_len=0,                # window length in tokens (0 = the model's positions)
        stride=0,                 # new tokens per window (0 = max_len: disjoint windows)
        limit=0,
    ),
    "generation": dict(
        max_new_tokens=32,
        stop=(),                  # strings that end the answer (cut after generation)
        extract="none",           # none | first_line | last_number | regex:<pattern>
        metrics=("exact_match", "token_f1"),   # + rouge_l, bleu
        chat=False,               # render the prompt as a user turn of the chat template
        system="",                # system message for chat=True
        num_fewshot=0,
        fewshot_path="",
        fewshot_delimiter="\n\n",
        target_delimiter=" ",
        description="",
        seed=1234,
        num_samples=1,            # completions per prompt (pass@k needs n >= k)
        temperature=0.0,          # 0 = greedy (then num_samples must be 1)
        top_p=1.0,
        top_k=0,
        pass_k=(1,),
        limit=0,
    ),
}
GEN_METRICS = ("exact_match", "token_f1", "rouge_l", "bleu")


@dataclasses.dataclass
class TaskSpec:
    """One task: a name (for reports), its kind, the records file and the resolved options."""
    name: str
    kind: str
    path: str
    options: dict


def _split_top(text: str) -> list[str]:
    """Splits on commas outside quotes and brackets."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p.strip()]


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_task_spec(spec: str) -> tuple[str, dict]:
    """`PATH[:k=v,k=v]` -> (path, options as written)."""
    path, opts = spec, {}
    m = re.match(r"^(.*?\.jsonl?)(?::(.*))?$", spec, re.S)
    if m:
        path, rest = m.group(1), m.group(2) or ""
        for part in _split_top(rest):
            key, eq, val = part.partition("=")
            if not eq:
                raise ValueError(f"task spec {spec!r}: option {part!r} is not key=value")
            opts[key.strip()] = _value(val.strip())
    return path, opts


def _read_jsonl(path: str) -> tuple[dict, list[dict]]:
    """(header options, records) of a task file; errors name the file and line."""
    from ftjax import paths
    real = paths.resolve(path)
    if not os.path.isfile(real):
        raise FileNotFoundError(f"task file {path!r} not found (looked in the current directory "
                                "and the ftjax root)")
    from ftjax.data.readers import read_jsonl_objects
    header, records = {}, []
    for n, rec in read_jsonl_objects(real):
        if HEADER_KEY in rec:
            if records or header:
                raise ValueError(f"{path} line {n}: the {HEADER_KEY!r} header must be the "
                                 "first line")
            header = dict(rec[HEADER_KEY])
            continue
        rec["_line"] = n
        records.append(rec)
    if not records:
        raise ValueError(f"task file {path} has no records")
    return header, records


def _infer_kind(path: str, rec: dict) -> str:
    if "choices" in rec:
        return "multiple_choice"
    if "text" in rec or ("prompt" in rec and "completion" in rec):
        return "perplexity"
    if ("prompt" in rec or "messages" in rec) and "answer" in rec:
        return "generation"
    raise ValueError(f"{path}: cannot tell the task kind from the first record's keys "
                     f"{sorted(k for k in rec if k != '_line')}; multiple_choice records have "
                     "context/choices/answer, perplexity ones text (or prompt/completion), "
                     "generation ones prompt/answer; or set kind= in the spec")


def task_from_dict(d: dict) -> tuple[TaskSpec, list[dict]]:
    """A task from `{"path": ..., "name"?: ..., "kind"?: ..., <options>}` (config entries)."""
    d = dict(d)
    path = d.pop("path", None)
    if not path:
        raise ValueError(f"eval task {d}: needs a 'path' to a JSONL file")
    return load_task(path, d)


def load_task(path: str, overrides: Optional[dict] = None) -> tuple[TaskSpec, list[dict]]:
    """The task in `path` with `overrides` on top of its header; (spec, records)."""
    header, records = _read_jsonl(path)
    opts = {**header, **(overrides or {})}
    name = str(opts.pop("name", "") or os.path.splitext(os.path.basename(path))[0])
    kind = str(opts.pop("kind", "") or _infer_kind(path, records[0]))
    if kind not in KINDS:
        raise ValueError(f"task {name}: unknown kind {kind!r}; known: {sorted(KINDS)}")
    unknown = sorted(set(opts) - set(KINDS[kind]))
    if unknown:
        raise ValueError(f"task {name} ({kind}): unknown option(s) {unknown}; its options are "
                         f"{sorted(KINDS[kind])}")
    options = {**KINDS[kind], **opts}
    _check_options(name, kind, options)
    if options.get("limit"):
        records = records[:int(options["limit"])]
    for rec in records:
        _check_record(path, kind, rec)
    return TaskSpec(name=name, kind=kind, path=path, options=options), records


def _check_options(name: str, kind: str, o: dict) -> None:
    if kind == "generation":
        bad = sorted(set(o["metrics"]) - set(GEN_METRICS))
        if bad:
            raise ValueError(f"task {name}: unknown metric(s) {bad}; known: {list(GEN_METRICS)}")
        if isinstance(o["stop"], str):
            o["stop"] = (o["stop"],)
        if int(o["num_samples"]) < 1:
            raise ValueError(f"task {name}: num_samples must be >= 1")
        if int(o["num_samples"]) > 1 and float(o["temperature"]) <= 0:
            raise ValueError(f"task {name}: num_samples={o['num_samples']} needs "
                             "temperature > 0 (greedy decoding gives the same answer each time)")
        if isinstance(o["pass_k"], int):
            o["pass_k"] = (o["pass_k"],)
        over = [k for k in o["pass_k"] if int(k) > int(o["num_samples"])]
        if over:
            raise ValueError(f"task {name}: pass_k {over} needs num_samples >= {max(over)}")
        M.extract_answer("", str(o["extract"]))  # a bad mode or regex fails here, named
    if kind == "perplexity" and int(o["stride"]) > int(o["max_len"] or 1 << 30):
        raise ValueError(f"task {name}: stride {o['stride']} > max_len {o['max_len']}")


def _check_record(path: str, kind: str, rec: dict) -> None:
    where = f"{path} line {rec['_line']}"
    if kind == "multiple_choice":
        ctx = rec.get("context", rec.get("question"))
        ch = rec.get("choices")
        if not isinstance(ctx, str) or not isinstance(ch, list) or len(ch) < 2 \
                or not all(isinstance(c, str) and c for c in ch):
            raise ValueError(f"{where}: a multiple_choice record needs 'context' (str) and "
                             "'choices' (a list of >= 2 non-empty strings)")
        golds = rec.get("answer")
        golds = golds if isinstance(golds, list) else [golds]
        if not golds or not all(isinstance(g, int) and 0 <= g < len(ch) for g in golds):
            raise ValueError(f"{where}: 'answer' must be the index (or list of indices) of "
                             f"the correct choice(s), 0..{len(ch) - 1}; got {rec.get('answer')!r}")
    elif kind == "perplexity":
        if "text" in rec:
            if not isinstance(rec["text"], str) or not rec["text"]:
                raise ValueError(f"{where}: 'text' must be a non-empty string")
        elif not (isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str)
                  and rec["completion"]):
            raise ValueError(f"{where}: a perplexity record needs 'text', or 'prompt' and a "
                             "non-empty 'completion'")
    else:
        ans = rec.get("answer")
        if not (isinstance(rec.get("prompt"), str) or isinstance(rec.get("messages"), list)):
            raise ValueError(f"{where}: a generation record needs 'prompt' (str)")
        if not (isinstance(ans, str) or (isinstance(ans, list) and ans
                                         and all(isinstance(a, str) for a in ans))):
            raise ValueError(f"{where}: 'answer' must be a string or a list of strings")


# ------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------

def encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with bos, continuation ids), split as lm-evaluation-harness splits them:
    trailing spaces of the context move to the continuation, and the continuation's ids are
    those of `encode(context + continuation)` after the context's, so tokens that merge
    across the boundary are scored as the model would see them."""
    n = len(context) - len(context.rstrip(" "))
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole = list(tok.encode(context + continuation))
    ctx = list(tok.encode(context)) if context else []
    if whole[:len(ctx)] != ctx:        # the boundary merged into one token: score it whole
        ctx = ctx[:-1]
    return bos_prefix(tok) + ctx, whole[len(ctx):]


def _gold(rec: dict) -> str:
    """A record's reference text for few-shot examples."""
    if "choices" in rec:
        a = rec["answer"]
        return rec["choices"][a[0] if isinstance(a, list) else a]
    a = rec["answer"]
    return a[0] if isinstance(a, list) else a


def _context(rec: dict) -> str:
    return rec.get("context", rec.get("question", rec.get("prompt", "")))


def fewshot_prefix(o: dict, records: Sequence[dict], i: int, pool: Optional[list]) -> str:
    """The description and `num_fewshot` solved examples before record i, chosen by a
    generator seeded with (seed, i), never record i itself."""
    k = int(o["num_fewshot"])
    text = o["description"] or ""
    if k <= 0:
        return text
    candidates = pool if pool is not None else [r for j, r in enumerate(records) if j != i]
    if len(candidates) < k:
        raise ValueError(f"num_fewshot={k} but only {len(candidates)} examples to draw from; "
                         "lower it or give fewshot_path")
    rng = random.Random(int(o["seed"]) * 1_000_003 + i)
    shots = rng.sample(candidates, k)
    return text + "".join(_context(r) + o["target_delimiter"] + _gold(r) + o["fewshot_delimiter"]
                          for r in shots)


def _pool(o: dict) -> Optional[list]:
    if not o.get("fewshot_path"):
        return None
    return _read_jsonl(o["fewshot_path"])[1]


# ------------------------------------------------------------------------------------------
# Running a task
# ------------------------------------------------------------------------------------------

def run_task(engine: Any, spec: TaskSpec, records: list[dict], *,
             template: Optional[str] = None) -> tuple[dict, list[dict]]:
    """(result, samples): the task's metrics (`metrics`, `stderr`, `n`, `kind`, `wall_s`) and
    one record per example for inspection."""
    t0 = time.time()
    fn = {"multiple_choice": _run_mc, "perplexity": _run_ppl,
          "generation": _run_gen}[spec.kind]
    metrics, stderr, samples = fn(engine, spec.options, records, template)
    return ({"kind": spec.kind, "path": spec.path, "n": len(records), "metrics": metrics,
             "stderr": stderr, "options": _jsonable(spec.options),
             "wall_s": round(time.time() - t0, 3)}, samples)


def _jsonable(o: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in o.items()}


def _run_mc(engine, o, records, template):
    tok = engine.tokenizer
    pool = _pool(o)
    requests, spans = [], []
    for i, rec in enumerate(records):
        ctx = fewshot_prefix(o, records, i, pool) + _context(rec)
        lo = len(requests)
        for c in rec["choices"]:
            requests.append(encode_pair(tok, ctx, o["target_delimiter"] + c))
        spans.append((lo, len(requests)))
    res = engine.loglik(requests)
    accs, norms, confs, correct, samples = [], [], [], [], []
    for rec, (lo, hi) in zip(records, spans):
        lls = [r.loglik for r in res[lo:hi]]
        s = M.multiple_choice(lls, rec["choices"], rec["answer"])
        accs.append(s["acc"])
        norms.append(s["acc_norm"])
        confs.append(s["confidence"])
        correct.append(s["acc"])
        samples.append({"line": rec["_line"], "lls": lls, "pred": int(s["pred"]),
                        "pred_norm": int(s["pred_norm"]), "answer": rec["answer"],
                        "acc": s["acc"], "acc_norm": s["acc_norm"]})
    metrics = {"acc": float(np.mean(accs)), "acc_norm": float(np.mean(norms)),
               "ece": M.expected_calibration_error(confs, correct, n_bins=int(o["ece_bins"])),
               "confidence": float(np.mean(confs))}
    stderr = {"acc": M.mean_stderr(accs), "acc_norm": M.mean_stderr(norms)}
    return metrics, stderr, samples


def rolling_windows(ids: Sequence[int], prefix: Sequence[int], max_len: int,
                    stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) requests that predict every token of `ids` exactly once.

    The first window predicts ids[:max_len] after `prefix` (bos); each next one predicts the
    following `stride` tokens with the `max_len - stride` tokens before them as context
    (stride == max_len: disjoint windows, lm-evaluation-harness's loglikelihood_rolling)."""
    out, pos = [], min(max_len, len(ids))
    out.append((list(prefix) if prefix else [], list(ids[:pos])))
    while pos < len(ids):
        end = min(pos + stride, len(ids))
        ctx_lo = max(0, end - max_len - 1)
        out.append((list(ids[ctx_lo:pos]), list(ids[pos:end])))
        pos = end
    return out


def _run_ppl(engine, o, records, template):
    tok = engine.tokenizer
    max_len = int(o["max_len"]) or engine.max_len
    max_len = min(max_len, engine.max_len)
    stride = int(o["stride"]) or max_len
    requests, owner = [], []
    for i, rec in enumerate(records):
        if "text" in rec:
            ids = list(tok.encode(rec["text"]))
            prefix = bos_prefix(tok) or [int(tok.eos_id)]
            for ctx, cont in rolling_windows(ids, prefix, max_len, stride):
                if not ctx:
                    ctx = prefix
                requests.append((ctx, cont))
                owner.append(i)
        else:
            requests.append(encode_pair(tok, rec["prompt"], rec["completion"]))
            owner.append(i)
    res = engine.loglik(requests)
    nll = np.zeros(len(records))
    ntok = np.zeros(len(records), np.int64)
    for i, r in zip(owner, res):
        nll[i] -= r.loglik
        ntok[i] += r.n_tokens
    texts = [rec.get("text", rec.get("completion", "")) for rec in records]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_words = sum(len(re.split(r"\s+", t.strip())) for t in texts)
    total = float(nll.sum())
    metrics = {"token_perplexity": M.perplexity(total, int(ntok.sum())),
               "word_perplexity": M.word_perplexity(total, n_words),
               "byte_perplexity": M.byte_perplexity(total, n_bytes),
               "bits_per_byte": M.bits_per_byte(total, n_bytes),
               "nll_per_token": total / max(int(ntok.sum()), 1),
               "tokens": int(ntok.sum())}
    samples = [{"line": rec["_line"], "nll": float(nll[i]), "tokens": int(ntok[i]),
                "perplexity": math.exp(nll[i] / max(ntok[i], 1))}
               for i, rec in enumerate(records)]
    per_doc = [s["nll"] / max(s["tokens"], 1) for s in samples]
    return metrics, {"nll_per_token": M.mean_stderr(per_doc)}, samples


def _gen_prompt(engine, o, records, i, pool, template) -> list[int]:
    tok, rec = engine.tokenizer, records[i]
    if o["chat"]:
        from ftjax.data.chat import apply_chat_template
        msgs = ([{"role": "system", "content": o["system"]}] if o["system"] else [])
        if "messages" in rec:
            msgs += list(rec["messages"])
        else:
            msgs.append({"role": "user",
                         "content": fewshot_prefix(o, records, i, pool) + rec["prompt"]})
        return list(apply_chat_template(tok, msgs, add_generation_prompt=True,
                                        template=template))
    return bos_prefix(tok) + list(tok.encode(fewshot_prefix(o, records, i, pool)
                                             + rec["prompt"]))


def _cut_ids(tok, ids: Sequence[int], text_len: int) -> list[int]:
    """The shortest prefix of `ids` whose decoded text reaches `text_len` characters (the
    tokens that produced the text kept after stop strings)."""
    for m in range(len(ids) + 1):
        if len(tok.decode(list(ids[:m]))) >= text_len:
            return list(ids[:m])
    return list(ids)


def _run_gen(engine, o, records, template):
    tok = engine.tokenizer
    pool = _pool(o)
    n = int(o["num_samples"])
    prompts = [_gen_prompt(engine, o, records, i, pool, template) for i in range(len(records))]
    gens = engine.generate([p for p in prompts for _ in range(n)],
                           max_new_tokens=int(o["max_new_tokens"]),
                           temperature=float(o["temperature"]), top_k=int(o["top_k"]),
                           top_p=float(o["top_p"]), seed=int(o["seed"]))
    stops = tuple(o["stop"])
    texts, kept = [], []
    for g in gens:
        full = tok.decode(list(g.ids))
        text = M.truncate_at_stop(full, stops) if stops else full
        texts.append(text)
        kept.append(_cut_ids(tok, g.ids, len(text)) if len(text) < len(full) else list(g.ids))
    # Confidence: log-probs (temperature 1) of the kept tokens of each first sample.
    scored = [(prompts[i], kept[i * n]) for i in range(len(records)) if kept[i * n]]
    lps = iter(engine.loglik(scored)) if scored else iter(())
    refs = [rec["answer"] if isinstance(rec["answer"], list) else [rec["answer"]]
            for rec in records]
    how = str(o["extract"])
    per = {m: [] for m in o["metrics"] if m in ("exact_match", "token_f1")}
    firsts, samples, mean_lp, min_lp, pass_counts = [], [], [], [], []
    for i, rec in enumerate(records):
        answers = [M.extract_answer(texts[i * n + s], how) for s in range(n)]
        ref_x = [M.extract_answer(r, how) if how == "last_number" else r for r in refs[i]]
        firsts.append(answers[0])
        if "exact_match" in per:
            per["exact_match"].append(M.exact_match(answers[0], ref_x))
        if "token_f1" in per:
            per["token_f1"].append(M.token_f1(answers[0], ref_x))
        pass_counts.append(int(sum(M.exact_match(a, ref_x) for a in answers)))
        sample = {"line": rec["_line"], "completion": texts[i * n], "answer": answers[0],
                  "reference": refs[i]}
        if kept[i * n]:
            lp = next(lps).token_logps
            mean_lp.append(float(np.mean(lp)))
            min_lp.append(float(np.min(lp)))
            sample.update(mean_logp=mean_lp[-1], min_logp=min_lp[-1])
        if n > 1:
            sample["correct_samples"] = pass_counts[-1]
        samples.append(sample)
    metrics = {m: float(np.mean(v)) for m, v in per.items()}
    stderr = {m: M.mean_stderr(v) for m, v in per.items()}
    if "rouge_l" in o["metrics"]:
        metrics["rouge_l"] = M.rouge_l(firsts, refs)
    if "bleu" in o["metrics"]:
        if len({len(r) for r in refs}) > 1:
            width = max(len(r) for r in refs)
            refs_b = [r + [r[-1]] * (width - len(r)) for r in refs]
        else:
            refs_b = refs
        metrics["bleu"] = M.bleu(firsts, refs_b)
    if n > 1 or float(o["temperature"]) > 0:
        for k in o["pass_k"]:
            vals = [M.pass_at_k(n, c, int(k)) for c in pass_counts]
            metrics[f"pass@{int(k)}"] = float(np.mean(vals))
            stderr[f"pass@{int(k)}"] = M.mean_stderr(vals)
    if mean_lp:
        metrics["mean_token_logp"] = float(np.mean(mean_lp))
        metrics["min_token_logp"] = float(np.mean(min_lp))
    metrics["finished"] = float(np.mean([g.finished or len(t) < len(tok.decode(list(g.ids)))
                                         for g, t in zip(gens, texts)]))
    return metrics, stderr, samples

