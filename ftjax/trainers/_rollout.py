"""Rollouts for the on-policy trainers (GRPO, RLOO, PPO): the loop's `OnPolicy` producer.

Every `num_iterations` steps it samples `group_size` completions for each of
`prompts_per_step` training prompts with the current (sharded) params through the jitted
KV-cache sampler, scores them with the reward functions, and builds the rollout batch of
`align.pg`: prompt + completion rows, the sampling policy's per-token log-probs (`old_logps`),
the reference's (`ref_logps`, when asked) and what the trainer adds (advantages, returns).
The steps in between reuse that generation (TRL's num_iterations / PPO epochs: the clipped
ratio then moves away from 1), each epoch split into `num_mini_batches` minibatches of
train.batch_size rows in a fresh seeded order.

Deterministic: prompts are visited in a seeded order by step, and the sampling key is
`fold_in(seed, rollout step)`, so a run resumed at a rollout boundary draws exactly what an
uninterrupted one draws (the trainers require checkpoint_every to be a multiple of
num_iterations). Every process samples the same global batch and keeps its own rows.

Reward functions are plain Python callables `(prompt, completion, example) -> float`, named in
the config by a registry name ("exact", "format") or as "module:function". One that raises or
returns NaN stops the run with its name (`RewardError`); the checkpoints already written stay.
"""
from __future__ import annotations

import importlib
import math
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from ftjax.align.pg import sampling_logps
from ftjax.align.precompute import global_host
from ftjax.align.reference import strip_adapters
from ftjax.data.batching import SEPARATOR, bos_prefix
from ftjax.infer.generate import generate_ids
from ftjax.models.heads import backbone
from ftjax.train.batches import OnPolicy

RewardFn = Callable[[str, str, dict], float]


class RewardError(RuntimeError):
    """A reward function raised or returned a non-finite value."""


def exact_answer(prompt: str, completion: str, example: dict) -> float:
    """1.0 when the completion equals the example's reference answer (both stripped): the
    synthetic suite's checker, a verifiable reward."""
    return float(completion.strip() == str(example["answer"]).strip())


def _shape(s: str) -> str:
    return "".join("9" if c.isdigit() else "a" if c.islower() else "A" if c.isupper() else c
                   for c in s.strip())


def answer_format(prompt: str, completion: str, example: dict) -> float:
    """1.0 when the completion has the reference answer's shape: the same length, digits where
    it has digits, lower / upper-case letters where it has them, the same other characters
    (an ISO date must look like 9999-99-99). A format reward that does not check the values."""
    return float(_shape(completion) == _shape(str(example["answer"])))


REWARDS: dict[str, RewardFn] = {"exact": exact_answer, "format": answer_format}


def resolve_rewards(names: Sequence[str]) -> list[tuple[str, RewardFn]]:
    """[(name, fn)] for registry names or "module:function" paths."""
    out = []
    for name in names:
        if name in REWARDS:
            out.append((name, REWARDS[name]))
            continue
        if ":" not in name:
            raise ValueError(f"reward function {name!r} is not known: use one of "
                             f"{sorted(REWARDS)} or 'module:function' (a Python callable "
                             "(prompt, completion, example) -> float)")
        mod, attr = name.split(":", 1)
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward function {name!r} cannot be imported: {e}") from None
        if not callable(fn):
            raise ValueError(f"reward function {name!r} is not callable")
        out.append((name, fn))
    if not out:
        raise ValueError("no reward functions: set reward_funcs (e.g. ('exact', 'format'))")
    return out


def prompt_ids(tok, prompt: str) -> list[int]:
    return bos_prefix(tok) + list(tok.encode(prompt + SEPARATOR))


def fit_prompts(examples: Sequence[dict], tok, budget: int, policy: str, name: str
                ) -> list[list[int]]:
    """Prompt token ids that leave `budget` tokens of prompt room: too long ones are refused
    (policy "refuse", naming how many and the first) or cut from the left keeping bos
    ("truncate"), and reported either way."""
    ids = [prompt_ids(tok, ex["prompt"]) for ex in examples]
    long = [i for i, x in enumerate(ids) if len(x) > budget]
    if not long:
        return ids
    first = examples[long[0]]["prompt"]
    msg = (f"[{name}] {len(long)} of {len(ids)} prompts are longer than the rollout budget of "
           f"{budget} prompt tokens (train.seq_len - max_new_tokens - 1); the first: "
           f"{first[:60]!r} ({len(ids[long[0]])} tokens)")
    if policy == "refuse":
        raise ValueError(msg + ". Raise train.seq_len, lower max_new_tokens, or set "
                               f"{name}.long_prompts=truncate")
    print(msg + "; they are truncated from the left")
    head = bos_prefix(tok)
    for i in long:
        ids[i] = head + ids[i][len(ids[i]) - (budget - len(head)):]
    return ids


class Rollouts(OnPolicy):
    """The rollout producer (see the module doc). Subclasses (the trainers) implement
    `finish(batch, rewards, extras) -> batch` to add their advantages."""

    def __init__(self, run, examples: Sequence[dict], s: Any, *, name: str,
                 reference: Optional[str] = None, ref_params: Any = None,
                 old_logps: bool = True, epochs: Optional[int] = None):
        t = run.cfg.train
        self.run, self.s, self.name = run, s, name
        self.examples = list(examples)
        self.n_prompts, self.group = int(s.prompts_per_step), int(s.group_size)
        self.rows, self.seq_len = int(t.batch_size), int(t.seq_len)
        self.mb = int(s.get("num_mini_batches", 1))
        if self.mb < 1:
            raise ValueError(f"{name}.num_mini_batches={self.mb} must be >= 1")
        self.total = self.rows * self.mb     # rollouts per generation
        if self.n_prompts * self.group != self.total:
            raise ValueError(f"{name}.prompts_per_step ({self.n_prompts}) x {name}.group_size "
                             f"({self.group}) = {self.n_prompts * self.group} rollouts per "
                             f"generation, but train.batch_size ({self.rows}) x "
                             f"{name}.num_mini_batches ({self.mb}) = {self.total}; make them "
                             "equal")
        self.max_new = int(s.max_new_tokens)
        budget = self.seq_len - self.max_new - 1
        if budget < 2:
            raise ValueError(f"train.seq_len={self.seq_len} leaves no room for a prompt beside "
                             f"{name}.max_new_tokens={self.max_new}; raise train.seq_len")
        self.prompts = fit_prompts(self.examples, run.tokenizer, budget,
                                   str(s.get("long_prompts", "refuse")), name)
        self.rewards = resolve_rewards(tuple(s.reward_funcs)) if "reward_funcs" in s else []
        w = tuple(float(x) for x in (s.get("reward_weights") or ())) or (1.0,) * len(self.rewards)
        if self.rewards and len(w) != len(self.rewards):
            raise ValueError(f"{name}.reward_weights has {len(w)} weights for "
                             f"{len(self.rewards)} reward functions")
        self.weights = np.asarray(w, np.float64)
        self.epochs = int(epochs if epochs is not None else s.get("num_iterations", 1))
        self.iters = self.epochs * self.mb   # optimizer steps per generation
        self.order = np.random.default_rng(run.seed).permutation(len(self.examples))
        self.reference, self.ref_params = reference, ref_params
        self.want_old = old_logps
        apply_fn = run.method.apply_fn
        temp = float(s.temperature)

        def logps(params, batch, strip=False, extras=False):
            """Per-token log-probs of the targets at the sampling temperature, under params
            (strip: with the adapters removed, i.e. the reference); with `extras`, also what
            `from_hidden` reads off the same forward (PPO's values)."""
            from ftjax import models
            p = strip_adapters(backbone(params)) if strip else backbone(params)
            fwd = models.apply if strip else (apply_fn or models.apply)
            logits, aux = fwd(p, run.model_cfg, batch["inputs"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"], return_hidden=extras)
            lp = sampling_logps(logits, batch["targets"], temp)
            return (lp, self.from_hidden(params, aux["hidden"])) if extras else lp

        self._logps = jax.jit(logps, static_argnames=("strip", "extras"))
        self.cache: Optional[tuple[int, dict]] = None
        self.history: list[dict] = []

    # -- hooks -------------------------------------------------------------------------------
    def finish(self, batch: dict, rewards: np.ndarray, extras: dict) -> dict:
        raise NotImplementedError

    wants_hidden = False   # subclasses that read `from_hidden` set it

    def from_hidden(self, params, hidden) -> dict:
        """Per-token arrays a trainer reads off the sampling policy's final hidden states in
        the old-log-prob forward (PPO: values); traced inside it."""
        return {}

    def score(self, examples: list[dict], texts: list[str], finished: np.ndarray
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(weighted reward [N], {function name: its rewards [N]}) of the completions."""
        per_fn = {}
        for fname, fn in self.rewards:
            values = np.zeros(len(texts), np.float64)
            for j, (ex, text) in enumerate(zip(examples, texts)):
                try:
                    value = float(fn(ex["prompt"], text, ex))
                except Exception as e:  # noqa: BLE001 (named and re-raised)
                    raise RewardError(f"[{self.name}] reward function {fname!r} raised on "
                                      f"prompt {ex['prompt'][:60]!r}, completion "
                                      f"{text[:60]!r}: {type(e).__name__}: {e}") from e
                if not math.isfinite(value):
                    raise RewardError(f"[{self.name}] reward function {fname!r} returned "
                                      f"{value} on prompt {ex['prompt'][:60]!r}, completion "
                                      f"{text[:60]!r}; rewards must be finite numbers")
                values[j] = value
            per_fn[fname] = values
        rewards = sum(w * per_fn[f] for w, (f, _) in zip(self.weights, self.rewards))
        return np.asarray(rewards, np.float64), per_fn

    # -- the producer --------------------------------------------------------------------------
    def next_batch(self, step: int, params: Any) -> dict:
        start = step - step % self.iters
        if self.cache is None or self.cache[0] != start:
            if step != start:
                raise RuntimeError(f"[{self.name}] step {step} is inside a rollout cycle of "
                                   f"{self.iters} steps that began at {start}, whose batch is "
                                   "gone (resumed mid-cycle?); checkpoint_every must be a "
                                   "multiple of num_iterations")
            self.cache = (start, self._rollout(start, params))
        glob = self.cache[1]
        epoch, m = divmod(step - start, self.mb)
        if self.mb > 1:   # each epoch visits the generation's rows once, in a fresh order
            order = np.random.default_rng([self.run.seed, start, epoch]).permutation(self.total)
            rows = np.sort(order[m * self.rows:(m + 1) * self.rows])
            glob = {k: v[rows] for k, v in glob.items()}
        pc, pi = jax.process_count(), jax.process_index()
        lo, hi = pi * self.rows // pc, (pi + 1) * self.rows // pc
        return {k: v[lo:hi] for k, v in glob.items()}

    _global = staticmethod(global_host)   # a batch-sharded array as the whole global batch

    def _rollout(self, step: int, params: Any) -> dict:
        s, tok, run = self.s, self.run.tokenizer, self.run
        k = self.group
        rollout_index = step // self.iters
        picks = [int(self.order[(rollout_index * self.n_prompts + i) % len(self.order)])
                 for i in range(self.n_prompts)]
        prompts = [self.prompts[j] for j in picks for _ in range(k)]
        t0 = time.perf_counter()
        outs = generate_ids(backbone(params), run.model_cfg, tok, prompts,
                            max_new_tokens=self.max_new, batch_size=len(prompts),
                            temperature=float(s.temperature), top_k=int(s.top_k),
                            rng=jax.random.fold_in(jax.random.PRNGKey(run.seed),
                                                   rollout_index),
                            apply_fn=run.method.apply_fn)
        gen_s = time.perf_counter() - t0
        texts = [tok.decode(ids) for ids in outs]
        finished = np.array([len(ids) < self.max_new for ids in outs])
        rewards, per_fn = self.score([self.examples[picks[j // k]] for j in range(len(outs))],
                                     texts, finished)
        batch = self._rows(prompts, outs, finished)
        extras: dict = {"texts": texts, "finished": finished, "picks": picks}
        if self.want_old or self.reference:
            placed = run.placement.put_batch({key: batch[key][self._local(self.total)]
                                              for key in batch})
            if self.want_old:
                lp, more = self._logps(params, placed, extras=True) if self.wants_hidden \
                    else (self._logps(params, placed), {})
                batch["old_logps"] = self._global(lp)
                extras.update({key: self._global(v) for key, v in more.items()})
            if self.reference == "strip":
                batch["ref_logps"] = self._global(self._logps(params, placed, strip=True))
            elif self.reference == "copy":
                batch["ref_logps"] = self._global(self._logps(self.ref_params, placed))
        batch = self.finish(batch, rewards, extras)
        n_tok = int(sum(len(o) for o in outs))
        rec = {"step": step, "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
               "completion_length": float(np.mean([len(o) for o in outs])),
               "finished": float(finished.mean()), "rollout_tok_s": n_tok / max(gen_s, 1e-9)}
        for fname, values in per_fn.items():
            rec[f"reward_{fname}"] = float(values.mean())
            rec[f"reward_{fname}_std"] = float(values.std())
        rec.update(extras.get("metrics", {}))
        self.history.append(rec)
        every = int(run.cfg.train.log_every)
        if jax.process_index() == 0 and (step // self.iters) % max(1, every // self.iters) == 0:
            print(f"[{self.name}] rollout at step {step}: " + " ".join(
                f"{key}={v:.3f}" for key, v in rec.items() if key != "step"))
        return batch

    def kl_to_start(self, params: Any, examples: Sequence[dict], ref_params: Any = None,
                    seed: int = 1) -> dict:
        """KL(π || π_start) estimated on completions the policy samples (at the rollout
        temperature) for `examples`' prompts: the mean over completions of Σ_t (log π - log
        π_start), the unbiased k1 estimate, and its mean per token. π_start is `ref_params`
        (a frozen starting copy) or, without one, the policy with its adapters stripped."""
        tok, run = self.run.tokenizer, self.run
        budget = self.seq_len - self.max_new - 1
        prompts = fit_prompts(examples, tok, budget, "truncate", self.name)
        prompts = (prompts * (-(-self.rows // len(prompts))))[:self.rows]
        outs = generate_ids(backbone(params), run.model_cfg, tok, prompts,
                            max_new_tokens=self.max_new, batch_size=len(prompts),
                            temperature=float(self.s.temperature), top_k=int(self.s.top_k),
                            rng=jax.random.fold_in(jax.random.PRNGKey(run.seed + seed), 10**6),
                            apply_fn=run.method.apply_fn)
        finished = np.array([len(o) < self.max_new for o in outs])
        batch = self._rows(prompts, outs, finished)
        placed = run.placement.put_batch({k: v[self._local()] for k, v in batch.items()})
        lp = self._global(self._logps(params, placed))
        ref = self._global(self._logps(ref_params, placed) if ref_params is not None
                           else self._logps(params, placed, strip=True))
        mask = batch["loss_mask"]
        per_seq = ((lp - ref) * mask).sum(1)
        return {"kl_per_completion": float(per_seq.mean()),
                "kl_per_token": float(per_seq.sum() / max(mask.sum(), 1.0))}

    def _local(self, rows: Optional[int] = None):
        rows = self.rows if rows is None else rows
        pc, pi = jax.process_count(), jax.process_index()
        return slice(pi * rows // pc, (pi + 1) * rows // pc)

    def _rows(self, prompts: list[list[int]], outs: list[list[int]], finished) -> dict:
        tok, t = self.run.tokenizer, self.seq_len
        b = {key: np.zeros((len(prompts), t), np.float32 if key == "loss_mask" else np.int32)
             for key in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
        b["inputs"][:] = tok.pad_id
        b["targets"][:] = tok.pad_id
        for i, (p, c, done) in enumerate(zip(prompts, outs, finished)):
            seq = list(p) + list(c) + ([tok.eos_id] if done else [])
            n = len(seq) - 1                     # inputs / targets
            b["inputs"][i, :n] = seq[:-1]
            b["targets"][i, :n] = seq[1:]
            b["loss_mask"][i, len(p) - 1:n] = 1.0  # the targets that are completion tokens
            b["segment_ids"][i, :n] = 1
            b["positions"][i, :n] = np.arange(n)
        return b

    def get_state(self) -> dict:
        return {"history": self.history}

    def set_state(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        self.cache = None
