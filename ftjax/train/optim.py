"""Optimizers and learning-rate schedules from config, through optax."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import optax

from ftjax.train import param_groups

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "lion", "rmsprop", "adagrad")
SCHEDULES = ("constant", "linear", "cosine")
# Zeroth-order: no gradients, no optimizer state (ftjax/train/mezo.py; its own step).
ZEROTH_ORDER = ("mezo",)

# The `optimizer` section: every setting with its default (configs/common.py:optimizer builds
# from it; `trainers.resolve_config` fills it into every run's config).
DEFAULTS = dict(
    name="adamw",            # OPTIMIZERS, or "mezo" (ZEROTH_ORDER)
    learning_rate=1e-3,
    schedule="cosine",       # SCHEDULES, each after a linear warmup from 0
    warmup_steps=0,
    min_lr_ratio=0.1,        # decay schedules end at learning_rate * min_lr_ratio
    weight_decay=0.0,        # adamw, lion, adafactor, mezo
    b1=0.9, b2=0.999, eps=1e-8,
    momentum=0.9, nesterov=False,  # sgd (momentum also rmsprop)
    decay=0.9,               # rmsprop
    grad_clip_norm=1.0,      # global-norm clipping; 0 disables it (must be 0 for mezo)
    mezo_eps=1e-3,           # mezo: perturbation scale eps of the two forward passes
    # ((regex, None | lr multiplier | {"lr": m, "layers": (start, stop)}), ...): first full
    # match over trainable param paths wins; None freezes (ftjax/train/param_groups.py).
    param_groups=(),
)
# Refused before a run builds anything (`trainers/_validate.py`: a bound, or the allowed values).
# Across sections it also checks warmup_steps <= train.steps.
CHECKS = dict(
    name=OPTIMIZERS + ZEROTH_ORDER, schedule=SCHEDULES, learning_rate="> 0", warmup_steps=">= 0",
    min_lr_ratio="in [0, 1]", weight_decay=">= 0", b1="in [0, 1)", b2="in [0, 1)",
    eps=">= 0", momentum="in [0, 1)", decay="in [0, 1)", grad_clip_norm=">= 0",
    mezo_eps="> 0",
)


def _settings(opt_cfg: Any) -> Any:
    """The section with every default filled in (a config may name only what it changes)."""
    given = opt_cfg.to_dict() if hasattr(opt_cfg, "to_dict") else dict(opt_cfg)
    return SimpleNamespace(**{**DEFAULTS, **given})


def make_schedule(opt_cfg: Any, total_steps: int) -> Callable[[Any], Any]:
    """Warmup (linear from 0) followed by constant, linear decay or cosine decay.

    Decay schedules go from `learning_rate` to `learning_rate * min_lr_ratio` at `total_steps`.
    """
    o = _settings(opt_cfg)
    lr = float(o.learning_rate)
    warmup = int(o.warmup_steps)
    kind = o.schedule
    end = lr * float(o.min_lr_ratio)
    if kind not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={kind!r} is not supported; choose one of {SCHEDULES}")
    if warmup >= total_steps and kind != "constant":
        raise ValueError(f"optimizer.warmup_steps={warmup} must be smaller than the number of "
                         f"training steps ({total_steps}) for a decaying schedule")
    decay_steps = max(total_steps - warmup, 1)
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "linear":
        main = optax.linear_schedule(lr, end, decay_steps)
    else:
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(opt_cfg: Any, total_steps: int):
    """Returns (optax transformation, schedule). Clipping by global norm comes first.

    `opt_cfg.param_groups` (optional): per-path freezing, learning-rate multipliers and layer
    ranges wrapped around the whole optimizer (see `ftjax.train.param_groups`).
    """
    o = _settings(opt_cfg)
    name = o.name
    sched = make_schedule(opt_cfg, total_steps)
    wd = float(o.weight_decay)
    b1, b2, eps = float(o.b1), float(o.b2), float(o.eps)
    if name == "adamw":
        tx = optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    elif name == "adam":
        tx = optax.adam(sched, b1=b1, b2=b2, eps=eps)
    elif name == "sgd":
        tx = optax.sgd(sched, momentum=float(o.momentum) or None, nesterov=bool(o.nesterov))
    elif name == "adafactor":
        tx = optax.adafactor(sched, weight_decay_rate=wd or None)
    elif name == "lion":
        tx = optax.lion(sched, b1=b1, b2=b2, weight_decay=wd)
    elif name == "rmsprop":
        tx = optax.rmsprop(sched, decay=float(o.decay), eps=eps,
                           momentum=float(o.momentum) or None)
    elif name == "adagrad":
        tx = optax.adagrad(sched, eps=eps)
    elif name == "mezo":
        return _mezo(o, sched), sched
    else:
        raise ValueError(f"optimizer.name={name!r} is not supported; choose one of "
                         f"{OPTIMIZERS + ZEROTH_ORDER}")
    clip = float(o.grad_clip_norm)
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    groups = o.param_groups
    if groups:
        tx = param_groups.with_groups(tx, groups)
    return tx, sched


def _mezo(o, sched):
    """MeZO (ftjax/train/mezo.py): plain SGD on a two-forward-pass estimate, weight decay
    allowed; settings that only make sense with real gradients are refused."""
    from ftjax.train import mezo
    if float(o.grad_clip_norm) > 0:
        raise ValueError(f"optimizer.grad_clip_norm={o.grad_clip_norm} does not apply to mezo "
                         "(its gradient estimate g z has norm ~ |g| sqrt(#params)); set "
                         "--config.optimizer.grad_clip_norm=0")
    if o.param_groups:
        raise ValueError("optimizer.param_groups are not supported with optimizer.name=mezo; "
                         "freeze leaves through the PEFT method's train_patterns instead")
    return mezo.mezo(sched, eps=float(o.mezo_eps), weight_decay=float(o.weight_decay))
