"""The DPO family of preference losses as pure per-pair functions of sequence log-probs.

Notation (TRL's DPOTrainer, see docs/alignment.md): for a pair (chosen c, rejected r) with
summed completion log-probs under the policy and the reference,

    Δ_c = log π(c) - log π_ref(c),   Δ_r = log π(r) - log π_ref(r),   h = Δ_c - Δ_r,

n_c, n_r the completion-token counts, β > 0 and ε the label smoothing. Every function returns
one loss per pair [B]; `combine` forms Σ_k w_k · loss_k per pair, whose mean over pairs is
Σ_k w_k · mean(loss_k), TRL's combination of a `loss_type` list.

ORPO and SimPO need no reference; they use the mean log-prob ℓ = log π / n.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

log_sigmoid = jax.nn.log_sigmoid


class Pairs(NamedTuple):
    """Per-pair inputs of the losses (all [B] float32; `chosen_nll` may be a scalar).

    Reference log-probs are None for reference-free objectives. `chosen_nll` is the token-mean
    negative log-likelihood of the chosen completions (the "sft" term).
    """
    chosen_logps: jax.Array
    rejected_logps: jax.Array
    chosen_counts: jax.Array
    rejected_counts: jax.Array
    ref_chosen_logps: Optional[jax.Array] = None
    ref_rejected_logps: Optional[jax.Array] = None
    chosen_nll: Optional[jax.Array] = None


# --------------------------------------------------------------------------------------------
# Reference-based losses (arguments: the log-ratios Δ_c, Δ_r)
# --------------------------------------------------------------------------------------------

def sigmoid(chosen_logratios, rejected_logratios, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, eq. 7): -log σ(β h); with ε > 0 the conservative cDPO form
    -(1-ε) log σ(β h) - ε log σ(-β h) (Mitchell 2023; older TRL)."""
    z = beta * (chosen_logratios - rejected_logratios)
    return -(1.0 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z)


def hinge(chosen_logratios, rejected_logratios, beta: float):
    """SLiC-style hinge (Zhao et al. 2023): relu(1 - β h)."""
    return jax.nn.relu(1.0 - beta * (chosen_logratios - rejected_logratios))


def ipo(chosen_logratios, rejected_logratios, chosen_counts, rejected_counts, beta: float):
    """IPO (Azar et al. 2023, eq. 17) on length-normalised log-ratios, β playing τ:
    (Δ_c/n_c - Δ_r/n_r - 1/(2β))²."""
    h = (chosen_logratios / jnp.maximum(chosen_counts, 1.0)
         - rejected_logratios / jnp.maximum(rejected_counts, 1.0))
    return jnp.square(h - 1.0 / (2.0 * beta))


def robust(chosen_logratios, rejected_logratios, beta: float, label_smoothing: float):
    """Robust DPO (Chowdhury et al. 2024) for labels flipped with probability ε:
    [-(1-ε) log σ(β h) + ε log σ(-β h)] / (1 - 2ε)."""
    z = beta * (chosen_logratios - rejected_logratios)
    return (-(1.0 - label_smoothing) * log_sigmoid(z)
            + label_smoothing * log_sigmoid(-z)) / (1.0 - 2.0 * label_smoothing)


def sigmoid_norm(chosen_logratios, rejected_logratios, chosen_counts, rejected_counts,
                 beta: float):
    """DPO on length-normalised log-ratios: -log σ(β (Δ_c/n_c - Δ_r/n_r))."""
    h = (chosen_logratios / jnp.maximum(chosen_counts, 1.0)
         - rejected_logratios / jnp.maximum(rejected_counts, 1.0))
    return -log_sigmoid(beta * h)


def apo_zero(chosen_logratios, rejected_logratios, beta: float):
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): (1 - σ(β Δ_c)) + σ(β Δ_r); raises the
    chosen likelihood and lowers the rejected one."""
    return (1.0 - jax.nn.sigmoid(beta * chosen_logratios)) + jax.nn.sigmoid(beta * rejected_logratios)


def apo_down(chosen_logratios, rejected_logratios, beta: float):
    """APO-down (eq. 8): σ(β Δ_c) + (1 - σ(β h)); for chosen answers worse than the model's."""
    return (jax.nn.sigmoid(beta * chosen_logratios)
            + 1.0 - jax.nn.sigmoid(beta * (chosen_logratios - rejected_logratios)))


def bco_pair(chosen_logratios, rejected_logratios, beta: float):
    """Paired BCO (Jung et al. 2024): -log σ(β Δ_c) - log σ(-β Δ_r)."""
    return -log_sigmoid(beta * chosen_logratios) - log_sigmoid(-beta * rejected_logratios)


def nca_pair(chosen_logratios, rejected_logratios, beta: float):
    """NCA (Chen et al. 2024): -log σ(β Δ_c) - ½ log σ(-β Δ_c) - ½ log σ(-β Δ_r)."""
    c, r = beta * chosen_logratios, beta * rejected_logratios
    return -log_sigmoid(c) - 0.5 * log_sigmoid(-c) - 0.5 * log_sigmoid(-r)


def sppo_hard(chosen_logratios, rejected_logratios, beta: float):
    """SPPO with hard win probabilities (Wu et al. 2024): (Δ_c - 1/(2β))² + (Δ_r + 1/(2β))²."""
    return (jnp.square(chosen_logratios - 0.5 / beta)
            + jnp.square(rejected_logratios + 0.5 / beta))


def exo_pair(chosen_logratios, rejected_logratios, beta: float, label_smoothing: float):
    """EXO (Ji et al. 2024, eq. 16), KL(p_θ || p_label) over {chosen, rejected} with label
    distribution (1-ε, ε): σ(z)(log σ(z) - log(1-ε)) + σ(-z)(log σ(-z) - log ε), z = β h."""
    z = beta * (chosen_logratios - rejected_logratios)
    return (jax.nn.sigmoid(z) * (log_sigmoid(z) - jnp.log1p(-label_smoothing))
            + jax.nn.sigmoid(-z) * (log_sigmoid(-z) - jnp.log(label_smoothing)))


def discopop(chosen_logratios, rejected_logratios, beta: float, tau: float = 0.05):
    """DiscoPOP (Chris Lu et al. 2024, eq. 5): with z = β h and m = σ(z/τ),
    (1 - m)(-log σ(z)) + m exp(-z)."""
    z = beta * (chosen_logratios - rejected_logratios)
    m = jax.nn.sigmoid(z / tau)
    return (1.0 - m) * -log_sigmoid(z) + m * jnp.exp(-z)


# --------------------------------------------------------------------------------------------
# Reference-free objectives
# --------------------------------------------------------------------------------------------

def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - e^x) for x < 0, stable at both ends (Mächler 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) far from it."""
    x = jnp.minimum(x, -1e-7)  # 1 - e^0 = 0: keep the log finite for a certain completion
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo(chosen_mean_logps, rejected_mean_logps, chosen_nll, beta: float):
    """ORPO (Hong et al. 2024): NLL(chosen) - λ log σ(log-odds ratio), λ = β, with
    log-odds(ℓ) = ℓ - log(1 - e^ℓ) on mean log-probs ℓ."""
    log_odds = ((chosen_mean_logps - rejected_mean_logps)
                - (log1mexp(chosen_mean_logps) - log1mexp(rejected_mean_logps)))
    return chosen_nll - beta * log_sigmoid(log_odds)


def simpo(chosen_mean_logps, rejected_mean_logps, beta: float, gamma: float,
          label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024): -log σ(β (ℓ_c - ℓ_r) - γ), label-smoothed as TRL's
    CPOTrainer. Add an "sft" term for CPO-SimPO."""
    z = beta * (chosen_mean_logps - rejected_mean_logps) - gamma
    return -(1.0 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z)


# --------------------------------------------------------------------------------------------
# Registry and combination
# --------------------------------------------------------------------------------------------

REFERENCE_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "sigmoid_norm", "apo_zero", "apo_down",
                    "bco_pair", "nca_pair", "sppo_hard", "exo_pair", "discopop")
REFERENCE_FREE_LOSSES = ("sft", "orpo", "simpo")
LOSS_TYPES = REFERENCE_LOSSES + REFERENCE_FREE_LOSSES


def needs_reference(loss_types: Sequence[str]) -> bool:
    """True when any of the losses compares the policy with a reference model."""
    return any(t in REFERENCE_LOSSES for t in loss_types)


def check_settings(loss_types: Sequence[str], loss_weights: Sequence[float], beta: float,
                   label_smoothing: float, where: str = "dpo") -> None:
    """Raises a ValueError naming the config field for settings no loss can use."""
    if not loss_types:
        raise ValueError(f"{where}.loss_type is empty; use e.g. ('sigmoid',)")
    unknown = [t for t in loss_types if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"{where}.loss_type: unknown {unknown}; choose from {list(LOSS_TYPES)}")
    if loss_weights and len(loss_weights) != len(loss_types):
        raise ValueError(f"{where}.loss_weights has {len(loss_weights)} entries for "
                         f"{len(loss_types)} loss types {list(loss_types)}; give one weight per "
                         "type or leave it empty (all 1)")
    if not beta > 0:
        raise ValueError(f"{where}.beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{where}.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if "exo_pair" in loss_types and label_smoothing <= 0:
        raise ValueError(f"{where}.loss_type exo_pair needs {where}.label_smoothing > 0 "
                         "(the EXO paper suggests 1e-3)")


def per_type_losses(p: Pairs, loss_types: Sequence[str], beta: float,
                    label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
                    discopop_tau: float = 0.05) -> dict[str, jax.Array]:
    """{loss type: per-pair loss [B]} for the requested types."""
    out = {}
    if needs_reference(loss_types):
        if p.ref_chosen_logps is None or p.ref_rejected_logps is None:
            raise ValueError(f"loss types {list(loss_types)} need reference log-probs")
        dc = p.chosen_logps - p.ref_chosen_logps
        dr = p.rejected_logps - p.ref_rejected_logps
    lc = p.chosen_logps / jnp.maximum(p.chosen_counts, 1.0)
    lr = p.rejected_logps / jnp.maximum(p.rejected_counts, 1.0)
    eps = label_smoothing
    for t in loss_types:
        if t in out:
            continue
        if t == "sigmoid":
            v = sigmoid(dc, dr, beta, eps)
        elif t == "hinge":
            v = hinge(dc, dr, beta)
        elif t == "ipo":
            v = ipo(dc, dr, p.chosen_counts, p.rejected_counts, beta)
        elif t == "robust":
            v = robust(dc, dr, beta, eps)
        elif t == "sigmoid_norm":
            v = sigmoid_norm(dc, dr, p.chosen_counts, p.rejected_counts, beta)
        elif t == "apo_zero":
            v = apo_zero(dc, dr, beta)
        elif t == "apo_down":
            v = apo_down(dc, dr, beta)
        elif t == "bco_pair":
            v = bco_pair(dc, dr, beta)
        elif t == "nca_pair":
            v = nca_pair(dc, dr, beta)
        elif t == "sppo_hard":
            v = sppo_hard(dc, dr, beta)
        elif t == "exo_pair":
            v = exo_pair(dc, dr, beta, eps)
        elif t == "discopop":
            v = discopop(dc, dr, beta, discopop_tau)
        elif t == "sft":
            v = jnp.broadcast_to(_nll(p), lc.shape)
        elif t == "orpo":
            v = orpo(lc, lr, _nll(p), beta)
        elif t == "simpo":
            v = simpo(lc, lr, beta, simpo_gamma, eps)
        else:
            raise ValueError(f"unknown loss type {t!r}; choose from {list(LOSS_TYPES)}")
        out[t] = v
    return out


def _nll(p: Pairs) -> jax.Array:
    if p.chosen_nll is None:
        raise ValueError("the sft and orpo losses need Pairs.chosen_nll")
    return p.chosen_nll


def combine(losses: Mapping[str, jax.Array], loss_types: Sequence[str],
            loss_weights: Sequence[float] = ()) -> jax.Array:
    """Σ_k w_k · loss_k per pair (weights default to 1)."""
    weights = list(loss_weights) or [1.0] * len(loss_types)
    return sum(float(w) * losses[t] for t, w in zip(loss_types, weights))


def rewards(p: Pairs, beta: float, reference: bool) -> tuple[jax.Array, jax.Array]:
    """Implicit rewards (chosen, rejected): β·Δ with a reference (DPO), else β·ℓ on mean
    log-probs (what TRL logs for ORPO and SimPO)."""
    if reference:
        return beta * (p.chosen_logps - p.ref_chosen_logps), beta * (p.rejected_logps - p.ref_rejected_logps)
    return (beta * p.chosen_logps / jnp.maximum(p.chosen_counts, 1.0),
            beta * p.rejected_logps / jnp.maximum(p.rejected_counts, 1.0))
