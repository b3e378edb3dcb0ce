"""The preference training objective as a `loss_fn(params, batch, rng)` for `ftjax.train.loop`.

Batch: the chosen and rejected halves in the causal-LM batch layout (`chosen_inputs`,
`chosen_targets`, `chosen_loss_mask`, `chosen_segment_ids`, `chosen_positions`, the same with
`rejected_`; row i of both is one pair), plus `ref_chosen_logps` / `ref_rejected_logps`
[B, 1] when the reference log-probs come with the data (precompute / copy modes).

The loss returns sums over the micro-batch and `stats["tokens"]` = the number of real pairs,
so the step's division gives per-pair means that stay exact under gradient accumulation.
Rows whose chosen and rejected halves are both empty (eval padding) count nowhere; a pair
with exactly one empty half is a data error, counted in `stats["broken_pairs"]`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from ftjax.align import dpo
from ftjax.align.reference import pair_logps, strip_adapters
from ftjax.models.config import ModelConfig
from ftjax.models.moe import add_moe_losses

PAIR_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the loss computes (the `dpo` config section, see `from_config`)."""
    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] = ()
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    # Where reference log-probs come from: "strip" (in the step), "batch" (precompute/copy:
    # columns of the batch) or "none" (reference-free objectives).
    reference: str = "strip"

    @property
    def uses_reference(self) -> bool:
        return dpo.needs_reference(self.loss_types)


# The `dpo` section of a config: every setting with its default (the "dpo" trainer declares
# it as its section; `configs/dpo_*.py` set what they change).
DEFAULTS = dict(
    loss_type=("sigmoid",),   # ftjax.align.dpo.LOSS_TYPES; several = sum of w_k * mean(loss_k)
    loss_weights=(),          # one weight per loss type; () = all 1
    beta=0.1,                 # DPO beta (ORPO: lambda; IPO: tau)
    label_smoothing=0.0,      # epsilon of cDPO (sigmoid), robust, exo_pair, simpo
    simpo_gamma=0.5,          # SimPO target margin gamma
    discopop_tau=0.05,        # DiscoPOP temperature
    reference="auto",         # auto | strip | precompute | copy (ftjax/align/reference.py)
    eval_before=True,         # evaluate the starting model too (summary "before")
)


def from_config(section: Any, reference: str) -> Settings:
    """Settings from a config's `dpo` section (defaults filled in) and the resolved reference
    mode."""
    o = {**DEFAULTS, **(section.to_dict() if hasattr(section, "to_dict") else dict(section))}
    types = o["loss_type"]
    types = (types,) if isinstance(types, str) else tuple(types)
    weights = tuple(float(w) for w in (o["loss_weights"] or ()))
    s = Settings(loss_types=types, loss_weights=weights, beta=float(o["beta"]),
                 label_smoothing=float(o["label_smoothing"]),
                 simpo_gamma=float(o["simpo_gamma"]), discopop_tau=float(o["discopop_tau"]),
                 reference="none")
    dpo.check_settings(s.loss_types, s.loss_weights, s.beta, s.label_smoothing)
    if s.uses_reference:
        s = dataclasses.replace(s, reference="strip" if reference == "strip" else "batch")
    return s


def check_batch(batch: dict, settings: Settings) -> None:
    """Clear error for a batch that lacks the preference keys (e.g. an SFT loader)."""
    need = [f"{h}_{k}" for h in ("chosen", "rejected") for k in PAIR_KEYS]
    if settings.reference == "batch":
        need += ["ref_chosen_logps", "ref_rejected_logps"]
    missing = [k for k in need if k not in batch]
    if missing:
        raise ValueError(f"preference batch lacks {missing}; it has {sorted(batch)}. A preference "
                         "loader yields chosen_*/rejected_* halves in the causal-LM layout")


def preference_loss(model_cfg: ModelConfig, settings: Settings, apply_fn=None,
                    bind_rng=None):
    """The loss_fn for `loop.train`.

    apply_fn: the PEFT method's replacement of `models.apply` (prompt/prefix tuning), used for
    the policy; the stripped reference always runs `models.apply`. bind_rng: per-step
    randomness of the policy (LoRA dropout); never applied to the reference or in eval.
    MoE models add the router losses of the policy forward (`models.moe.add_moe_losses`).
    """
    s = settings
    jitter = model_cfg.num_experts > 0 and model_cfg.router_jitter > 0

    def loss_fn(params, batch, rng):
        check_batch(batch, s)
        policy = params if (bind_rng is None or rng is None) else bind_rng(params, rng)
        kw = {"rng": jax.random.fold_in(rng, 1)} if jitter and rng is not None else {}
        pol = pair_logps(policy, model_cfg, batch, apply_fn, **kw)
        ref_c = ref_r = None
        if s.reference == "strip":
            ref_params = jax.lax.stop_gradient(strip_adapters(params))
            ref = pair_logps(ref_params, model_cfg, batch)
            ref_c, ref_r = ref["chosen"], ref["rejected"]
        elif s.reference == "batch":
            ref_c = batch["ref_chosen_logps"].reshape(-1).astype(jnp.float32)
            ref_r = batch["ref_rejected_logps"].reshape(-1).astype(jnp.float32)
        objective, stats = pair_stats(pol, ref_c, ref_r, s)
        # MoE policies: the router losses, per pair (the step divides by the pair count).
        return add_moe_losses(objective, stats, pol["aux"], model_cfg)

    return loss_fn


def pair_stats(pol: dict, ref_c: Optional[jax.Array], ref_r: Optional[jax.Array],
               s: Settings) -> tuple[jax.Array, dict]:
    """(objective summed over real pairs, summed stats) from per-pair log-probs."""
    nc, nr = pol["chosen_counts"], pol["rejected_counts"]
    valid = ((nc > 0) & (nr > 0)).astype(jnp.float32)
    broken = ((nc > 0) != (nr > 0)).astype(jnp.float32)
    # The "sft" term is TRL's: token-mean NLL over every chosen completion token of the batch.
    chosen_nll = -jnp.sum(pol["chosen"] * valid) / jnp.maximum(jnp.sum(nc * valid), 1.0)
    pairs = dpo.Pairs(pol["chosen"], pol["rejected"], nc, nr, ref_c, ref_r, chosen_nll)
    per_type = dpo.per_type_losses(pairs, s.loss_types, s.beta, s.label_smoothing,
                                   s.simpo_gamma, s.discopop_tau)
    total = dpo.combine(per_type, s.loss_types, s.loss_weights)
    rc, rr = dpo.rewards(pairs, s.beta, s.uses_reference)
    rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
    vsum = lambda x: jnp.sum(x * valid)
    objective = vsum(total)
    stats = {
        "nll": jax.lax.stop_gradient(objective),   # the loop logs nll/tokens as "loss"
        "tokens": jnp.sum(valid),                  # the normaliser: real pairs
        "correct": vsum((rc > rr).astype(jnp.float32)),  # reward accuracy (as TRL's)
        # Exact ties are not wins; while the policy equals the reference every pair ties.
        "reward_ties": vsum((rc == rr).astype(jnp.float32)),
        "rewards_chosen": vsum(rc),
        "rewards_rejected": vsum(rr),
        "margin": vsum(rc - rr),
        "logps_chosen": vsum(jax.lax.stop_gradient(pol["chosen"])),
        "logps_rejected": vsum(jax.lax.stop_gradient(pol["rejected"])),
        "logps_accuracy": vsum((pol["chosen"] > pol["rejected"]).astype(jnp.float32)),
        "completion_tokens": vsum(nc + nr),
        "broken_pairs": jnp.sum(broken),
    }
    if len(s.loss_types) > 1:
        stats.update({f"loss_{t}": jax.lax.stop_gradient(vsum(v)) for t, v in per_type.items()})
    return objective, stats
