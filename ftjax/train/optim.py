"""Optimizers and learning-rate schedules from config, through optax."""
from __future__ import annotations

from typing import Any, Callable

import optax

from ftjax.train import param_groups

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "lion", "rmsprop", "adagrad")
SCHEDULES = ("constant", "linear", "cosine")


def make_schedule(opt_cfg: Any, total_steps: int) -> Callable[[Any], Any]:
    """Warmup (linear from 0) followed by constant, linear decay or cosine decay.

    Decay schedules go from `learning_rate` to `learning_rate * min_lr_ratio` at `total_steps`.
    """
    lr = float(opt_cfg.learning_rate)
    warmup = int(opt_cfg.get("warmup_steps", 0))
    kind = opt_cfg.get("schedule", "constant")
    end = lr * float(opt_cfg.get("min_lr_ratio", 0.0))
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
    name = opt_cfg.get("name", "adamw")
    sched = make_schedule(opt_cfg, total_steps)
    wd = float(opt_cfg.get("weight_decay", 0.0))
    b1, b2 = float(opt_cfg.get("b1", 0.9)), float(opt_cfg.get("b2", 0.999))
    eps = float(opt_cfg.get("eps", 1e-8))
    if name == "adamw":
        tx = optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    elif name == "adam":
        tx = optax.adam(sched, b1=b1, b2=b2, eps=eps)
    elif name == "sgd":
        tx = optax.sgd(sched, momentum=float(opt_cfg.get("momentum", 0.9)) or None,
                       nesterov=bool(opt_cfg.get("nesterov", False)))
    elif name == "adafactor":
        tx = optax.adafactor(sched, weight_decay_rate=wd or None)
    elif name == "lion":
        tx = optax.lion(sched, b1=b1, b2=float(opt_cfg.get("b2", 0.99)), weight_decay=wd)
    elif name == "rmsprop":
        tx = optax.rmsprop(sched, decay=float(opt_cfg.get("decay", 0.9)), eps=eps,
                           momentum=float(opt_cfg.get("momentum", 0.0)) or None)
    elif name == "adagrad":
        tx = optax.adagrad(sched, eps=eps)
    else:
        raise ValueError(f"optimizer.name={name!r} is not supported; choose one of {OPTIMIZERS}")
    clip = float(opt_cfg.get("grad_clip_norm", 0.0))
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    groups = opt_cfg.get("param_groups", ())
    if groups:
        tx = param_groups.with_groups(tx, groups)
    return tx, sched
