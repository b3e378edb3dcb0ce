"""KTO (Ethayarajh et al., 2024) on unpaired feedback: data layout and the loop's `loss_fn`.

Examples are {"prompt", "completion", "label"} (label True = desirable). Each example travels
with a KL row, the same prompt followed by another example's completion: the policy/reference
log-ratio on those mismatched pairs estimates the KL baseline z0 of the loss. As in TRL, the
partner is fixed per example (here: the next example in a seeded permutation of the data), so
the rows of an example never change between epochs and reference log-probs can be computed once.

Batch layout: the two-half layout of the preference objectives, so the reference machinery
(`align.reference` strip, `align.precompute` precompute/copy) applies unchanged:
`chosen_*` = the example's rows (prompt + completion), `rejected_*` = its KL row, and
`label` [B] (1 desirable, 0 undesirable). The pure loss is `align.rl.kto_losses`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.align.reference import pair_logps, strip_adapters
from ftjax.align.rl import KTO_LOSS_TYPES, kto_losses
from ftjax.data import SyntheticLoader
from ftjax.data.resumable import Resumable
from ftjax.data.synthetic import DeterministicRng
from ftjax.data.tokenizer import Tokenizer
from ftjax.models.config import ModelConfig
from ftjax.models.moe import add_moe_losses

DEFAULTS = dict(
    loss_type="kto",           # kto | apo_zero_unpaired
    beta=0.1,
    desirable_weight=1.0,      # lambda_D
    undesirable_weight=1.0,    # lambda_U
    reference="auto",          # auto | strip | precompute | copy (as dpo.reference)
    eval_before=True,
)


@dataclasses.dataclass(frozen=True)
class Settings:
    loss_type: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: str = "strip"   # "strip" (in the step) or "batch" (ref_*_logps columns)


def check_examples(examples: Sequence[Mapping], where: str = "KTO data") -> None:
    for i, ex in enumerate(examples):
        missing = [k for k in ("prompt", "completion", "label") if k not in ex]
        if missing:
            raise ValueError(f"{where}: example {i} lacks {missing} (has {sorted(ex)}); KTO "
                             "reads unpaired feedback {prompt, completion, label}")
        if not isinstance(ex["label"], (bool, np.bool_)):
            raise ValueError(f"{where}: example {i} has label {ex['label']!r}; use true "
                             "(desirable) or false (undesirable)")
    labels = [bool(ex["label"]) for ex in examples]
    if len(examples) < 2:
        raise ValueError(f"{where}: KTO needs at least 2 examples (the KL rows pair each prompt "
                         "with another example's completion)")
    if all(labels) or not any(labels):
        kind = "desirable" if all(labels) else "undesirable"
        raise ValueError(f"{where}: every example is {kind}; KTO needs both labels")


def weight_balance(examples: Sequence[Mapping], desirable_weight: float,
                   undesirable_weight: float) -> float:
    """λ_D·n_D / (λ_U·n_U); the KTO paper recommends [1, 4/3]."""
    n_d = sum(bool(e["label"]) for e in examples)
    n_u = len(examples) - n_d
    return desirable_weight * n_d / max(undesirable_weight * n_u, 1e-12)


def kl_partners(n: int, seed: int) -> np.ndarray:
    """partner[i] != i: the example whose completion forms example i's KL row."""
    order = np.asarray(DeterministicRng("kto-kl", seed).permutation(n), np.int64)
    partner = np.empty(n, np.int64)
    partner[order] = np.roll(order, -1)
    return partner


class KTOLoader(Resumable):
    """Deterministic, resumable KTO batches (see the module doc); all `SyntheticLoader`
    options apply. Padding rows (eval) have label 0 and no tokens."""

    def __init__(self, examples: Sequence[Mapping], tok: Tokenizer, batch_size: int,
                 seq_len: int, seed: int, kl_seed: int = 0, **loader_kw) -> None:
        check_examples(examples)
        partner = kl_partners(len(examples), kl_seed)
        rows = {"chosen": [{"prompt": e["prompt"], "answer": e["completion"]} for e in examples],
                "rejected": [{"prompt": e["prompt"], "answer": examples[j]["completion"]}
                             for e, j in zip(examples, partner)]}
        self.halves = {h: SyntheticLoader(ex, tok, batch_size, seq_len, seed, **loader_kw)
                       for h, ex in rows.items()}
        self.labels = np.array([bool(e["label"]) for e in examples], np.int32)
        self.num_examples = len(examples)

    @property
    def batches_per_epoch(self) -> int:
        return self.halves["chosen"].batches_per_epoch

    def _labels(self, step: int) -> np.ndarray:
        ld = self.halves["chosen"]
        idx = ld.global_indices(step)
        lo = ld.process_index * ld.local_batch_size
        idx = idx[lo:lo + ld.local_batch_size]
        out = np.zeros(ld.local_batch_size, np.int32)
        out[:len(idx)] = self.labels[idx]
        return out

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        batch = {}
        for h, ld in self.halves.items():
            batch.update({f"{h}_{k}": v for k, v in ld.batch_at(step).items()})
        batch["label"] = self._labels(step)[:, None]
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        ld = self.halves["chosen"]
        step = ld._step
        if ld.num_epochs is not None and step >= ld.num_epochs * ld.batches_per_epoch:
            raise StopIteration
        for h in self.halves.values():
            h._step += 1
        return self.batch_at(step)

    def get_state(self) -> dict:
        return self.halves["chosen"].get_state()

    def set_state(self, state: Mapping) -> None:
        for ld in self.halves.values():
            ld.set_state(state)


def from_config(section: Any, reference: str) -> Settings:
    o = {**DEFAULTS, **(section.to_dict() if hasattr(section, "to_dict") else dict(section))}
    if o["loss_type"] not in KTO_LOSS_TYPES:
        raise ValueError(f"kto.loss_type={o['loss_type']!r}: choose one of {KTO_LOSS_TYPES}")
    return Settings(loss_type=o["loss_type"], beta=float(o["beta"]),
                    desirable_weight=float(o["desirable_weight"]),
                    undesirable_weight=float(o["undesirable_weight"]),
                    reference="strip" if reference == "strip" else "batch")


def kto_loss(model_cfg: ModelConfig, settings: Settings, apply_fn=None, bind_rng=None):
    """`loss_fn(params, batch, rng)`: KTO summed over the real examples; stats["tokens"] is
    their count, so the step's division gives TRL's mean. The KL baseline is the mean over the
    (micro-)batch's real rows. Stats: `nll` (the loss), `kl` (z0 times the count),
    `rewards_desirable` / `rewards_undesirable` and their counts `n_desirable` /
    `n_undesirable` (β·(log π - log π_ref) summed per label)."""
    s = settings
    jitter = model_cfg.num_experts > 0 and model_cfg.router_jitter > 0

    def loss_fn(params, batch, rng):
        if "label" not in batch or "chosen_inputs" not in batch:
            raise ValueError(f"KTO batch lacks 'label' or the example rows (chosen_*); it has "
                             f"{sorted(batch)}. Use align.kto.KTOLoader")
        policy = params if (bind_rng is None or rng is None) else bind_rng(params, rng)
        kw = {"rng": jax.random.fold_in(rng, 1)} if jitter and rng is not None else {}
        pol = pair_logps(policy, model_cfg, batch, apply_fn, **kw)
        if s.reference == "strip":
            ref = pair_logps(jax.lax.stop_gradient(strip_adapters(params)), model_cfg, batch)
            ref_y, ref_kl = ref["chosen"], ref["rejected"]
        else:
            ref_y = batch["ref_chosen_logps"].reshape(-1).astype(jnp.float32)
            ref_kl = batch["ref_rejected_logps"].reshape(-1).astype(jnp.float32)
        valid = (pol["chosen_counts"] > 0).astype(jnp.float32)
        desirable = batch["label"].reshape(-1) > 0
        kl_policy = jax.lax.stop_gradient(pol["rejected"])   # z0 carries no gradient
        losses, z0, rewards = kto_losses(pol["chosen"], ref_y, kl_policy, ref_kl, desirable,
                                         valid, s.beta, s.desirable_weight,
                                         s.undesirable_weight, s.loss_type)
        n = jnp.sum(valid)
        d = valid * desirable
        u = valid * (~desirable)
        objective = jnp.sum(losses)
        stats = {"nll": jax.lax.stop_gradient(objective), "tokens": n, "kl": z0 * n,
                 "rewards_desirable": jnp.sum(rewards * d), "n_desirable": jnp.sum(d),
                 "rewards_undesirable": jnp.sum(rewards * u), "n_undesirable": jnp.sum(u)}
        return add_moe_losses(objective, stats, pol["aux"], model_cfg)

    return loss_fn


def _tokens_of(row: Mapping[str, np.ndarray]) -> tuple[list[int], int]:
    """(the row's token sequence [prompt + completion], index where the completion starts)."""
    n = int((row["segment_ids"] > 0).sum())
    if n == 0:
        return [], 0
    if len(np.unique(row["segment_ids"][:n])) > 1:
        raise ValueError("KTO rows must hold one example each (packing is off for unpaired data)")
    mask = row["loss_mask"][:n] > 0
    first = int(np.argmax(mask)) if mask.any() else n
    tokens = list(row["inputs"][:n]) + [int(row["targets"][n - 1])]
    return tokens, first + 1      # targets[t] is tokens[t + 1]


def _row(tokens: list[int], start: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The causal-LM row of `tokens` with the loss on tokens[start:] (cut to seq_len + 1)."""
    tokens = tokens[:seq_len + 1]
    n = len(tokens) - 1
    out = {"inputs": np.full(seq_len, pad_id, np.int32), "targets": np.full(seq_len, pad_id,
                                                                            np.int32),
           "loss_mask": np.zeros(seq_len, np.float32), "segment_ids": np.zeros(seq_len, np.int32),
           "positions": np.zeros(seq_len, np.int32)}
    if n <= 0:
        return out
    out["inputs"][:n] = tokens[:-1]
    out["targets"][:n] = tokens[1:]
    out["loss_mask"][max(start - 1, 0):n] = 1.0
    out["segment_ids"][:n] = 1
    out["positions"][:n] = np.arange(n)
    return out


def kl_layout(batch: Mapping[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """The data pipeline's unpaired batch (sft keys + label) -> the KTO layout: `chosen_*` the
    rows as they are, `rejected_*` their KL rows (row i's prompt tokens followed by the
    completion tokens of the next real row, cyclically within the batch, as TRL builds them),
    `label` [B, 1]. Token-level, so any chat template's prompt / completion split is kept."""
    keys = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
    b, t = batch["inputs"].shape
    rows = [{k: batch[k][i] for k in keys} for i in range(b)]
    seqs = [_tokens_of(r) for r in rows]
    real = [i for i, (tok, _) in enumerate(seqs) if tok]
    out = {f"chosen_{k}": np.asarray(batch[k]) for k in keys}
    kl = [_row([], 0, t, pad_id) for _ in range(b)]
    for j, i in enumerate(real):
        partner = real[(j + 1) % len(real)]
        p_tok, p_start = seqs[i]
        c_tok, c_start = seqs[partner]
        kl[i] = _row(p_tok[:p_start] + c_tok[c_start:], p_start, t, pad_id)
    for k in keys:
        out[f"rejected_{k}"] = np.stack([r[k] for r in kl])
    out["label"] = np.asarray(batch["label"]).reshape(b, 1).astype(np.int32)
    return out


class WithKLRows:
    """Wraps the pipeline's unpaired loader: every batch in the KTO layout (`kl_layout`);
    resumable through the wrapped loader's state."""

    def __init__(self, inner: Any, pad_id: int):
        self.inner, self.pad_id = inner, int(pad_id)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return kl_layout(next(self.inner), self.pad_id)

    def get_state(self) -> dict:
        return self.inner.get_state()

    def set_state(self, state) -> None:
        self.inner.set_state(state)

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()
