"""Losses and advantages of the RLHF-style trainers as pure JAX functions.

One function per quantity, each a function of arrays of log-probs, rewards and masks only (no
model, no optimiser), computed in float32. The shapes used throughout:

    B  rows (sequences) of the batch,  T  completion tokens per row,
    logps [B, T]  per-token log-probs of the sampled completion tokens (0 at padding),
    mask  [B, T]  1 on the completion tokens that count, 0 on padding (bool, int or float),
    seq_logps [B]  summed completion log-probs Σ_t logps·mask.

What each block matches (see ../shared/reference/hf-formats-and-losses.md, section 4, and the
TRL 1.16 trainers that tests/test_rl_losses.py compares with):

* `bradley_terry`: TRL's RewardTrainer (pairwise reward-model loss).
* `kto_losses`: TRL's KTOTrainer (unpaired desirable / undesirable examples).
* `group_advantages`, `grpo_per_token_loss`, `aggregate`: TRL's GRPOTrainer.
* `rloo_advantages`, `sequence_kl_rewards`, `rloo_loss`: TRL's RLOOTrainer.
* `ppo_rewards`, `gae`, `whiten`, `ppo_policy_loss`, `ppo_value_loss`: PPO with a value head
  (Ouyang et al. 2022; the published formulas of TRL's former PPOTrainer, which TRL 1.16 no
  longer ships).

Settings that no formula can use (an unknown loss type, a group size that does not divide the
batch, a negative clip range, ...) raise a ValueError that names the setting and says how to
fix it. The checks look only at Python values and array shapes, so every function can be
traced under `jax.jit` with those settings static.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

log_sigmoid = jax.nn.log_sigmoid
sigmoid = jax.nn.sigmoid

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")

# The constant added to a standard deviation before dividing by it (GRPO / RLOO advantages).
STD_EPS = 1e-4
# The constant inside rsqrt(var + ·) of masked whitening (PPO).
WHITEN_EPS = 1e-8


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _check_eps(epsilon_low: float, epsilon_high: float, where: str) -> None:
    if not epsilon_low >= 0:
        raise ValueError(f"{where}: epsilon_low must be >= 0, got {epsilon_low} (0.2 is usual)")
    if not epsilon_high >= 0:
        raise ValueError(f"{where}: epsilon_high must be >= 0, got {epsilon_high} "
                         "(0.2 is usual; DAPO recommends 0.28)")
    if epsilon_low >= 1:
        raise ValueError(f"{where}: epsilon_low must be < 1 (the ratio's lower clip bound is "
                         f"1 - epsilon_low), got {epsilon_low}")


def _check_same_shape(where: str, **arrays) -> None:
    shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{where}: the inputs must have one shape, got {shapes}")


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Σ x·m / max(Σ m, 1): the mean over the masked entries, 0 when there are none."""
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# --------------------------------------------------------------------------------------------
# Reward model (Bradley-Terry)
# --------------------------------------------------------------------------------------------

def bradley_terry(r_chosen, r_rejected, margin=None, center_coef: float = 0.0) -> jax.Array:
    """Pairwise reward-model loss per pair [B]:

        -log σ(r_c - r_r - m) + center_coef · (r_c + r_r)²

    with m the optional per-pair margin (0 when None). The mean over pairs is TRL
    RewardTrainer's loss, -mean(log σ(r_c - r_r - m)) + coef · mean((r_c + r_r)²); the centring
    term (Eisenstein et al. 2023, eq. 2; 0.01 is the recommended coefficient) pulls the rewards
    towards mean zero."""
    if not center_coef >= 0:
        raise ValueError(f"bradley_terry: center_coef must be >= 0 (0 turns the centring term "
                         f"off), got {center_coef}")
    rc, rr = _f32(r_chosen), _f32(r_rejected)
    _check_same_shape("bradley_terry", r_chosen=rc, r_rejected=rr)
    diff = rc - rr
    if margin is not None:
        diff = diff - _f32(margin)
    loss = -log_sigmoid(diff)
    if center_coef:
        loss = loss + center_coef * jnp.square(rc + rr)
    return loss


# --------------------------------------------------------------------------------------------
# KTO (unpaired)
# --------------------------------------------------------------------------------------------

def kto_losses(policy_logps, ref_logps, kl_policy_logps, kl_ref_logps, desirable, valid,
               beta: float = 0.1, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0, loss_type: str = "kto"
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """KTO losses (Ethayarajh et al. 2024, eq. 7) for a batch of unpaired examples.

    Inputs are per example [B]: summed completion log-probs under the policy and the
    reference, the same for the mismatched pairs (prompt_i, completion_{i+1 mod B}) that
    estimate the KL baseline, `desirable` (bool) and `valid` (1 on real rows, 0 on padding).
    With r = log π(y|x) - log π_ref(y|x):

        z0 = max(mean over valid rows of (log π(y'|x) - log π_ref(y'|x)), 0)   (no gradient)
        desirable:   λ_D · (1 - σ(β (r - z0)))
        undesirable: λ_U · (1 - σ(β (z0 - r)))

    `loss_type="apo_zero_unpaired"` (unpaired APO-zero, D'Oosterlinck et al. 2024) uses no KL
    baseline: desirable λ_D · (1 - σ(β r)), undesirable λ_U · σ(β r); the kl_* inputs may then
    be None and z0 is reported as 0.

    Returns (losses [B], 0 on padding rows; z0 scalar; rewards β·r [B], without gradient).
    TRL's KTOTrainer loss is the mean of the losses over the real rows, i.e.
    Σ losses / Σ valid. (TRL averages the KL of each process and then over processes; here
    the mean runs over all valid rows of the global batch.)"""
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"kto.loss_type: unknown {loss_type!r}; choose from {list(KTO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"kto.beta must be > 0, got {beta}")
    if not (desirable_weight >= 0 and undesirable_weight >= 0):
        raise ValueError(f"kto.desirable_weight and kto.undesirable_weight must be >= 0, got "
                         f"{desirable_weight} and {undesirable_weight}")
    policy_logps, ref_logps, valid = _f32(policy_logps), _f32(ref_logps), _f32(valid)
    desirable = jnp.asarray(desirable).astype(bool)
    _check_same_shape("kto_losses", policy_logps=policy_logps, ref_logps=ref_logps,
                      desirable=desirable, valid=valid)
    r = policy_logps - ref_logps
    if loss_type == "kto":
        if kl_policy_logps is None or kl_ref_logps is None:
            raise ValueError("kto_losses: loss_type 'kto' needs kl_policy_logps and kl_ref_logps "
                             "(log-probs of the mismatched pairs); use loss_type "
                             "'apo_zero_unpaired' for a loss without the KL baseline")
        kl_policy_logps, kl_ref_logps = _f32(kl_policy_logps), _f32(kl_ref_logps)
        _check_same_shape("kto_losses", policy_logps=policy_logps,
                          kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)
        z0 = jnp.maximum(_masked_mean(kl_policy_logps - kl_ref_logps, valid), 0.0)
        z0 = jax.lax.stop_gradient(z0)
        des = 1.0 - sigmoid(beta * (r - z0))
        und = 1.0 - sigmoid(beta * (z0 - r))
    else:
        z0 = jnp.zeros((), jnp.float32)
        des = 1.0 - sigmoid(beta * r)
        und = sigmoid(beta * r)
    losses = jnp.where(desirable, desirable_weight * des, undesirable_weight * und)
    losses = jnp.where(valid > 0, losses, 0.0)
    return losses, z0, jax.lax.stop_gradient(beta * r)


# --------------------------------------------------------------------------------------------
# Group advantages (GRPO, RLOO)
# --------------------------------------------------------------------------------------------

def _groups(rewards, group_size, where: str) -> jax.Array:
    rewards = _f32(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"{where}: rewards must be 1-D [N*G] (prompt i's G samples at rows "
                         f"i*G .. i*G+G-1), got shape {rewards.shape}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"{where}: group_size (num_generations) must be a positive int, "
                         f"got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"{where}: group_size (num_generations) {group_size} does not divide "
                         f"the batch of {rewards.shape[0]} rewards; make the batch a multiple "
                         "of the number of samples per prompt")
    return rewards.reshape(-1, group_size)


def _std1(x: jax.Array, axis=None, keepdims=False) -> jax.Array:
    """Standard deviation with Bessel's correction (ddof=1); 0 over a single element (where
    TRL also uses 0)."""
    n = x.size if axis is None else x.shape[axis]
    if n < 2:
        return jnp.zeros_like(jnp.mean(x, axis=axis, keepdims=keepdims))
    return jnp.std(x, axis=axis, keepdims=keepdims, ddof=1)


def group_advantages(rewards, group_size: int, scale: str = "group") -> jax.Array:
    """GRPO advantages [N*G] (Shao et al. 2024) for G = group_size samples per prompt, stored
    consecutively (prompt i's samples at rows i*G .. i*G+G-1):

        A = (r - mean_group(r)) / (std + 1e-4)

    The baseline is always the group mean. `scale` picks the std, with Bessel's correction:
    "group" the std of the sample's group (TRL's default), "batch" the std of all N*G rewards
    (TRL 1.16 still subtracts the *group* mean there), "none" no division (Dr. GRPO, Liu et
    al. 2025). A group of one sample gets std 0, as in TRL."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards: unknown {scale!r}; choose from {list(SCALE_REWARDS)}")
    grouped = _groups(rewards, group_size, "group_advantages")
    adv = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if scale == "group":
        adv = adv / (_std1(grouped, axis=1, keepdims=True) + STD_EPS)
    elif scale == "batch":
        adv = adv / (_std1(grouped) + STD_EPS)
    return adv.reshape(-1)


def rloo_advantages(rewards, group_size: int, normalize: bool = False) -> jax.Array:
    """RLOO advantages [N*G] (Ahmadian et al. 2024): within each group of G >= 2 samples,

        A_i = r_i - (Σ_{j≠i} r_j) / (G - 1),

    the reward minus the leave-one-out mean of its siblings. With `normalize` (TRL's
    `normalize_advantages`), A ← (A - mean(A)) / (std(A) + 1e-4) over the whole batch, std with
    Bessel's correction as in TRL 1.16."""
    grouped = _groups(rewards, group_size, "rloo_advantages")
    if group_size < 2:
        raise ValueError(f"rloo_advantages: group_size (num_generations) must be >= 2 for a "
                         f"leave-one-out baseline, got {group_size}")
    baseline = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (group_size - 1)
    adv = (grouped - baseline).reshape(-1)
    if normalize:
        adv = (adv - jnp.mean(adv)) / (_std1(adv) + STD_EPS)
    return adv


def sequence_kl_rewards(rewards, logps, ref_logps, mask, beta: float) -> jax.Array:
    """RLOO's KL-penalised reward [B]: r - β Σ_t (log π_old - log π_ref)·mask, the k1 estimate
    summed over each completion (TRL's RLOOTrainer, beta 0.05 there, puts the KL into the
    reward rather than the loss). `logps` are the sampling policy's per-token log-probs."""
    if not beta >= 0:
        raise ValueError(f"rloo.beta must be >= 0 (0 turns the KL penalty off), got {beta}")
    logps, ref_logps, mask = _f32(logps), _f32(ref_logps), _f32(mask)
    _check_same_shape("sequence_kl_rewards", logps=logps, ref_logps=ref_logps, mask=mask)
    kl = jnp.sum(kl_k1(logps, ref_logps) * mask, axis=-1)
    return _f32(rewards) - beta * kl


# --------------------------------------------------------------------------------------------
# KL estimators (Schulman 2020, "Approximating KL divergence")
# --------------------------------------------------------------------------------------------

def kl_k1(logps, ref_logps) -> jax.Array:
    """k1 estimate of KL(π || π_ref) per token: log π - log π_ref (unbiased, can be < 0)."""
    return _f32(logps) - _f32(ref_logps)


def kl_k3(logps, ref_logps) -> jax.Array:
    """k3 estimate of KL(π || π_ref) per token: e^(log π_ref - log π) - (log π_ref - log π) - 1
    (unbiased and >= 0; GRPO's KL term)."""
    d = _f32(ref_logps) - _f32(logps)
    return jnp.exp(d) - d - 1.0


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------

def grpo_per_token_loss(logps, old_logps, ref_logps, advantages, mask,
                        epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
                        delta: Optional[float] = None, importance_level: str = "token",
                        bias_correction_kl: bool = False) -> tuple[jax.Array, dict]:
    """GRPO's clipped surrogate per token [B, T], as TRL 1.16's GRPOTrainer
    (loss types grpo / bnpo / dr_grpo / dapo), before `aggregate`:

        ρ = exp(log π - log π_old)                       importance_level "token"
        ρ = exp(Σ_t (log π - log π_old)·m / max(Σ_t m, 1))   "sequence" (GSPO), one per row
        loss = -min(min(ρ, δ)·A, clip(ρ, 1 - ε_low, 1 + ε_high)·A) + β·KL_t

    `old_logps=None` means the policy that sampled is the current one (num_iterations 1): the
    old log-probs are stop_gradient(logps), so ρ = 1 but its gradient is not 0. `advantages`
    is [B] (one per sequence) or [B, T]. δ (`delta`, INTELLECT-2; None for off) caps the ratio
    of the unclipped term from above. KL_t = `kl_k3`, multiplied by ρ when
    `bias_correction_kl` (TRL's `use_bias_correction_kl`); `ref_logps` may be None when
    β = 0.

    The loss is returned for every position, padding included; `aggregate` masks it. Stats
    (scalars, as TRL logs them): "clip_low" the fraction with ρ < 1 - ε_low and A < 0,
    "clip_high" with ρ > 1 + ε_high and A > 0 (ρ after the δ cap, as TRL), "clip_region"
    either; means over the masked tokens, or over the rows at sequence level. "kl" (when
    `ref_logps` is given, whatever β) the mean over the masked tokens of KL_t (times ρ with
    `bias_correction_kl`), as TRL's logged "kl"."""
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"grpo.importance_sampling_level: unknown {importance_level!r}; choose "
                         f"from {list(IMPORTANCE_LEVELS)}")
    _check_eps(epsilon_low, epsilon_high, "grpo")
    if not beta >= 0:
        raise ValueError(f"grpo.beta must be >= 0 (0 turns the KL term off), got {beta}")
    if delta is not None and not delta > 0:
        raise ValueError(f"grpo.delta must be None (off) or > 0 (INTELLECT-2 recommends a value "
                         f"above 1 + epsilon_high), got {delta}")
    if beta != 0 and ref_logps is None:
        raise ValueError(f"grpo: beta={beta} needs ref_logps (the reference model's per-token "
                         "log-probs); set beta=0 to train without a reference")
    logps, mask = _f32(logps), _f32(mask)
    if logps.ndim != 2:
        raise ValueError(f"grpo: logps must be [B, T], got shape {logps.shape}")
    old_logps = jax.lax.stop_gradient(logps) if old_logps is None else _f32(old_logps)
    ref_logps = None if ref_logps is None else _f32(ref_logps)
    _check_same_shape("grpo_per_token_loss", logps=logps, old_logps=old_logps,
                      ref_logps=ref_logps, mask=mask)
    adv = _f32(advantages)
    if adv.ndim == 1:
        adv = adv[:, None]
    if adv.shape[0] != logps.shape[0]:
        raise ValueError(f"grpo: advantages has {adv.shape[0]} rows for {logps.shape[0]} "
                         "sequences")

    log_ratio = logps - old_logps
    if importance_level == "token":
        log_w = log_ratio
    else:
        log_w = (jnp.sum(log_ratio * mask, axis=-1, keepdims=True)
                 / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0))
    ratio = jnp.exp(log_w)
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    capped = ratio if delta is None else jnp.minimum(ratio, delta)
    loss = -jnp.minimum(capped * adv, clipped * adv)
    loss = jnp.broadcast_to(loss, logps.shape)

    stats = {}
    if ref_logps is not None:
        kl = kl_k3(logps, ref_logps)
        if bias_correction_kl:
            kl = kl * ratio
        if beta != 0:
            loss = loss + beta * kl
        stats["kl"] = jax.lax.stop_gradient(_masked_mean(kl, mask))

    low = ((capped < 1.0 - epsilon_low) & (adv < 0)).astype(jnp.float32)
    high = ((capped > 1.0 + epsilon_high) & (adv > 0)).astype(jnp.float32)
    region = jnp.maximum(low, high)
    if low.shape[-1] == 1:  # one ratio per sequence: the fraction of sequences
        frac = lambda x: jnp.mean(x)
    else:
        frac = lambda x: _masked_mean(jnp.broadcast_to(x, mask.shape), mask)
    stats.update(clip_low=frac(low), clip_high=frac(high), clip_region=frac(region))
    return loss, jax.lax.stop_gradient(stats)


def aggregate(per_token_loss, mask, loss_type: str, max_completion_length: Optional[int] = None,
              num_items=None) -> jax.Array:
    """Reduces a per-token loss [B, T] to the scalar loss, as TRL 1.16's GRPOTrainer:

        grpo:    mean over rows of Σ_t loss·m / max(Σ_t m, 1)   (DeepSeekMath; length-biased)
        bnpo:    Σ loss·m / max(Σ m, 1)                         (mean over this batch's tokens)
        dr_grpo: Σ loss·m / (B · max_completion_length)          (Dr. GRPO)
        dapo:    Σ loss·m / max(num_items, 1)                     (DAPO; TRL's default)

    `num_items` is the global count of active tokens that the dapo loss normalises by; TRL
    uses those of the whole gradient-accumulation window (divided by the number of processes,
    which is the number of micro-batches the mean runs over). It defaults to Σ m, which makes
    dapo equal bnpo for one micro-batch. TRL divides grpo, bnpo and dr_grpo (not dapo) by the
    number of accumulation steps as well; that is the trainer's business, not done here."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo.loss_type: unknown {loss_type!r}; choose from "
                         f"{list(GRPO_LOSS_TYPES)}")
    loss, mask = _f32(per_token_loss), _f32(mask)
    _check_same_shape("aggregate", per_token_loss=loss, mask=mask)
    masked = loss * mask
    if loss_type == "grpo":
        per_seq = jnp.sum(masked, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
        return jnp.mean(per_seq)
    if loss_type == "bnpo":
        return jnp.sum(masked) / jnp.maximum(jnp.sum(mask), 1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None or not max_completion_length > 0:
            raise ValueError("grpo: loss_type 'dr_grpo' needs max_completion_length > 0 (the "
                             f"generation length limit), got {max_completion_length}")
        return jnp.sum(masked) / (loss.shape[0] * max_completion_length)
    n = jnp.sum(mask) if num_items is None else _f32(num_items)
    return jnp.sum(masked) / jnp.maximum(n, 1.0)


# --------------------------------------------------------------------------------------------
# RLOO
# --------------------------------------------------------------------------------------------

def rloo_loss(seq_logps, old_seq_logps, advantages, valid, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2) -> jax.Array:
    """RLOO's clipped surrogate per sequence [B], as TRL 1.16's RLOOTrainer, whose ratio is
    sequence-level (not per token):

        ρ = exp(Σ_t log π - Σ_t log π_old),
        loss = -min(ρ·A, clip(ρ, 1 - ε_low, 1 + ε_high)·A),

    0 on rows with `valid` 0. `old_seq_logps=None` means stop_gradient(seq_logps) (ρ = 1).
    TRL's loss is the plain mean over the rows, i.e. Σ loss / Σ valid here."""
    _check_eps(epsilon_low, epsilon_high, "rloo")
    seq_logps, adv, valid = _f32(seq_logps), _f32(advantages), _f32(valid)
    old = jax.lax.stop_gradient(seq_logps) if old_seq_logps is None else _f32(old_seq_logps)
    _check_same_shape("rloo_loss", seq_logps=seq_logps, old_seq_logps=old, advantages=adv,
                      valid=valid)
    ratio = jnp.exp(seq_logps - old)
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = -jnp.minimum(ratio * adv, clipped * adv)
    return jnp.where(valid > 0, loss, 0.0)


# --------------------------------------------------------------------------------------------
# PPO with a value head
# --------------------------------------------------------------------------------------------

def ppo_rewards(score, kl_per_token, mask, kl_coef: float) -> jax.Array:
    """Per-token PPO rewards [B, T] (Ziegler et al. 2019; Ouyang et al. 2022):

        r_t = -kl_coef · kl_t · m_t,  plus the reward model's score at each row's last masked
        token (rows without tokens get no score).

    `kl_per_token` is an estimate such as `kl_k1` or `kl_k3`. (Some implementations put the
    score one position after the last response token; here it goes on the last real token,
    so that it lies inside the mask.)"""
    if not kl_coef >= 0:
        raise ValueError(f"ppo.kl_coef must be >= 0, got {kl_coef}")
    kl, mask = _f32(kl_per_token), _f32(mask)
    _check_same_shape("ppo_rewards", kl_per_token=kl, mask=mask)
    t = mask.shape[-1]
    has = jnp.any(mask > 0, axis=-1)
    last = t - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=-1)
    bonus = jax.nn.one_hot(last, t, dtype=jnp.float32) * jnp.where(has, _f32(score), 0.0)[:, None]
    return -kl_coef * kl * mask + bonus


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016) along the tokens [B, T]:

        δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γλ A_{t+1},   R_t = A_t + V_t,

    a reverse `lax.scan`, with rewards and values taken as 0 outside the mask (so V = 0 after
    each row's last real token, and A, R are 0 on padding after it). Returns (advantages,
    returns), both [B, T] and free of gradient (they are regression targets)."""
    if not 0 <= gamma <= 1:
        raise ValueError(f"ppo.gamma must be in [0, 1], got {gamma}")
    if not 0 <= lam <= 1:
        raise ValueError(f"ppo.lam must be in [0, 1], got {lam}")
    rewards, values, mask = _f32(rewards), _f32(values), _f32(mask)
    _check_same_shape("gae", rewards=rewards, values=values, mask=mask)
    r, v = rewards * mask, values * mask
    v_next = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    deltas = r + gamma * v_next - v

    def step(carry, d):
        a = d + gamma * lam * carry
        return a, a

    _, adv_t = jax.lax.scan(step, jnp.zeros(rewards.shape[0], jnp.float32), deltas.T,
                            reverse=True)
    adv = adv_t.T * mask
    returns = (adv + v) * mask
    return jax.lax.stop_gradient(adv), jax.lax.stop_gradient(returns)


def whiten(x, mask, shift_mean: bool = True) -> jax.Array:
    """Masked whitening: (x - μ) · rsqrt(σ² + 1e-8), with μ the masked mean and σ² the masked
    variance with Bessel's correction (Σ m / (Σ m - 1); none when Σ m <= 1, where TRL's
    masked_whiten raises instead). `shift_mean=False` adds μ back (rescale only, as PPO does
    with rewards). Values outside the mask are transformed too; mask them after if needed."""
    x, mask = _f32(x), _f32(mask)
    _check_same_shape("whiten", x=x, mask=mask)
    n = jnp.sum(mask)
    mean = jnp.sum(x * mask) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.square(x - mean) * mask) / jnp.maximum(n, 1.0)
    var = var * jnp.where(n > 1, n / jnp.maximum(n - 1.0, 1.0), 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + WHITEN_EPS)
    return out if shift_mean else out + mean


def ppo_policy_loss(logps, old_logps, advantages, mask, cliprange: float = 0.2
                    ) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped policy loss (Schulman et al. 2017) over tokens [B, T]:

        ρ = exp(log π - log π_old),   loss = masked mean of max(-A ρ, -A clip(ρ, 1 ± c)),

    with c = `cliprange`. Returns (loss, clipfrac), clipfrac the masked fraction of tokens
    where the clipped term is the larger."""
    if not 0 <= cliprange < 1:
        raise ValueError(f"ppo.cliprange must be in [0, 1), got {cliprange}")
    logps, old, adv, mask = _f32(logps), _f32(old_logps), _f32(advantages), _f32(mask)
    _check_same_shape("ppo_policy_loss", logps=logps, old_logps=old, advantages=adv, mask=mask)
    ratio = jnp.exp(logps - old)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = _masked_mean(jnp.maximum(pg1, pg2), mask)
    clipfrac = _masked_mean((pg2 > pg1).astype(jnp.float32), mask)
    return loss, jax.lax.stop_gradient(clipfrac)


def ppo_value_loss(values, old_values, returns, mask, cliprange_value: float = 0.2
                   ) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped value loss over tokens [B, T]:

        V_clip = V_old + clip(V - V_old, -c, c),
        loss = ½ · masked mean of max((V - R)², (V_clip - R)²),

    with c = `cliprange_value`. Returns (loss, clipfrac), clipfrac the masked fraction of
    tokens where the clipped term is the larger."""
    if not cliprange_value >= 0:
        raise ValueError(f"ppo.cliprange_value must be >= 0, got {cliprange_value}")
    v, old, ret, mask = _f32(values), _f32(old_values), _f32(returns), _f32(mask)
    _check_same_shape("ppo_value_loss", values=v, old_values=old, returns=ret, mask=mask)
    v_clip = old + jnp.clip(v - old, -cliprange_value, cliprange_value)
    vf1 = jnp.square(v - ret)
    vf2 = jnp.square(v_clip - ret)
    loss = 0.5 * _masked_mean(jnp.maximum(vf1, vf2), mask)
    clipfrac = _masked_mean((vf2 > vf1).astype(jnp.float32), mask)
    return loss, jax.lax.stop_gradient(clipfrac)
