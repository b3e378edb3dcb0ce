"""Loss-curve diagnosis: warnings for loss spikes, overfitting, plateaus and a learning rate
that is too high, read off the rows the training loop logs.

`CurveDoctor` is plain Python (no JAX, no I/O). The loop hands it every logged train row
(`observe_train({"step", "loss", "grad_norm", ...})`) and every evaluation row
(`observe_eval({"step", "eval_loss", ...})`); each call returns the warnings that *start* at
that row. A condition is an episode: it warns once when it begins and can warn again only
after it has been clear for a while (`CurveDoctor`'s `rearm`), so a long plateau is one line,
not one per step. The statistics (docs/monitoring.md, "Loss-curve diagnosis"):

- divergence: the loss is non-finite, or it exceeds `spike_factor` × the median of the
  previous `spike_window` logged losses (and by at least `floor` nats);
- overfitting: for `overfit_evals` consecutive evaluations the validation loss rose while the
  train loss (mean of the rows logged since the previous evaluation) fell;
- plateau: over the last `plateau_window` logged rows the smoothed loss (mean of the first
  and of the last quarter of the window) improved by less than `plateau_tol` (relative);
- lr_too_high: over the last `lr_window` rows the loss zig-zags (a fraction of at least
  `lr_sign_changes` of successive differences change sign), fluctuates strongly
  (std / |mean| >= `lr_cv` and std >= `floor` nats) and the trend is flat or rising (the second
  half's mean is not below the first half's by `plateau_tol`, relative, or more).
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import Any, Mapping, Optional

import numpy as np

KINDS = ("divergence", "overfitting", "plateau", "lr_too_high")

# The train-section keys the doctor reads (`ftjax/train/loop.py:DEFAULTS`), with defaults.
DEFAULTS = dict(
    spike_factor=3.0,
    spike_window=20,
    overfit_evals=3,
    plateau_window=50,
    plateau_tol=0.01,
    lr_window=20,
    lr_sign_changes=0.5,
    lr_cv=0.2,
    diagnose_floor=0.05,
)


@dataclasses.dataclass(frozen=True)
class CurveWarning:
    """One diagnosis: its kind (one of `KINDS`), the step it starts at, a one-line message."""
    kind: str
    step: int
    message: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "step": self.step, "message": self.message}


class _Episode:
    """Turns a condition checked repeatedly into one event per episode: True when the
    condition becomes true; the episode ends after `rearm` consecutive false checks."""

    def __init__(self, rearm: int):
        self.rearm, self.active, self.clear = max(1, int(rearm)), False, 0

    def starts(self, condition: bool) -> bool:
        if condition:
            self.clear = 0
            if self.active:
                return False
            self.active = True
            return True
        if self.active:
            self.clear += 1
            if self.clear >= self.rearm:
                self.active, self.clear = False, 0
        return False


def _g(x: float) -> str:
    return f"{x:.4g}"


class CurveDoctor:
    """Diagnoses a training curve row by row (see the module docstring for the statistics).

    rearm: consecutive normal rows that end a divergence episode. A plateau or lr_too_high
    episode ends after a whole window of rows without the condition (so a statistic that
    hovers at its threshold does not warn again and again); an overfitting episode ends at the
    first evaluation that breaks the streak.
    val_key: the validation loss in evaluation rows.
    """

    def __init__(self, *, spike_factor: float = 3.0, spike_window: int = 20,
                 overfit_evals: int = 3, plateau_window: int = 50, plateau_tol: float = 0.01,
                 lr_window: int = 20, lr_sign_changes: float = 0.5, lr_cv: float = 0.2,
                 floor: float = 0.05, rearm: int = 3, val_key: str = "eval_loss"):
        if spike_factor <= 1:
            raise ValueError(f"spike_factor must be > 1, got {spike_factor}")
        for name, v, lo in (("spike_window", spike_window, 3), ("overfit_evals", overfit_evals, 1),
                            ("plateau_window", plateau_window, 4), ("lr_window", lr_window, 4)):
            if int(v) < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")
        self.spike_factor, self.floor = float(spike_factor), float(floor)
        self.overfit_evals, self.plateau_tol = int(overfit_evals), float(plateau_tol)
        self.lr_sign_changes, self.lr_cv = float(lr_sign_changes), float(lr_cv)
        self.val_key = val_key
        self._spike_hist: deque = deque(maxlen=int(spike_window))
        self._plateau: deque = deque(maxlen=int(plateau_window))
        self._lr: deque = deque(maxlen=int(lr_window))
        self._episodes = {"divergence": _Episode(rearm), "overfitting": _Episode(1),
                          "plateau": _Episode(plateau_window), "lr_too_high": _Episode(lr_window)}
        # Overfitting: train losses logged since the last evaluation; per evaluation
        # (step, val, train level); the evaluation the current streak started after.
        self._since_eval: list[float] = []
        self._last_train: Optional[float] = None
        self._prev_eval: Optional[tuple[int, float, float]] = None
        self._streak_start: Optional[tuple[int, float, float]] = None
        self._streak = 0

    @classmethod
    def from_config(cls, train_cfg: Any) -> "CurveDoctor":
        """From the `train` section (a ConfigDict, dict or namespace; missing keys: DEFAULTS)."""
        get = (train_cfg.get if isinstance(train_cfg, Mapping) or hasattr(train_cfg, "get")
               else lambda k, d: getattr(train_cfg, k, d))
        s = {k: get(k, v) for k, v in DEFAULTS.items()}
        floor = s.pop("diagnose_floor")
        return cls(floor=float(floor), **s)

    # -- train rows ---------------------------------------------------------------------------

    def observe_train(self, row: Mapping[str, Any]) -> list[CurveWarning]:
        """Feeds one logged train row (`step`, `loss`, optional `grad_norm`)."""
        step, loss = int(row["step"]), float(row["loss"])
        out = []
        spike = self._is_spike(loss)
        w = self._check_spike(step, loss, spike, row.get("grad_norm"))
        if w:
            out.append(w)
        if not math.isfinite(loss):
            return out  # a non-finite loss would poison every window
        self._spike_hist.append(loss)
        self._since_eval.append(loss)
        self._last_train = loss
        if spike:
            return out  # reported as divergence; kept out of the plateau / lr_too_high windows
        self._plateau.append((step, loss))
        self._lr.append(loss)
        for check in (self._check_plateau, self._check_lr):
            w = check(step)
            if w:
                out.append(w)
        return out

    def _is_spike(self, loss: float) -> bool:
        """Whether `loss` is a spike against the previous rows (False until half the window
        is there)."""
        hist = self._spike_hist
        if not math.isfinite(loss):
            return True
        if len(hist) < max(3, hist.maxlen // 2):
            return False
        med = float(np.median(hist))
        # k × the median for a positive median; for a non-positive one (RL objectives) the same
        # distance above it, (k - 1)·|median|.
        excess = loss - med
        return excess > (self.spike_factor - 1.0) * abs(med) and excess >= self.floor

    def _check_spike(self, step: int, loss: float, spike: bool,
                     grad_norm: Any) -> Optional[CurveWarning]:
        if not self._episodes["divergence"].starts(spike):
            return None
        if not math.isfinite(loss):
            return CurveWarning("divergence", step, f"the loss is {loss}: the run diverged")
        hist = self._spike_hist
        med = float(np.median(hist))
        excess = loss - med
        ratio = f"{loss / med:.1f}x" if med > 0 else f"{_g(excess)} above"
        gn = ""
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            gn = f" (grad_norm {_g(float(grad_norm))})"
        return CurveWarning(
            "divergence", step,
            f"loss spike: {_g(loss)} is {ratio} the median {_g(med)} of the last {len(hist)} "
            f"logged rows{gn}; if it does not come back down, lower optimizer.learning_rate or "
            f"set optimizer.grad_clip_norm")

    def _check_plateau(self, step: int) -> Optional[CurveWarning]:
        win = self._plateau
        if len(win) < win.maxlen:
            return None
        q = max(1, len(win) // 4)
        losses = [x for _, x in win]
        head, tail = float(np.mean(losses[:q])), float(np.mean(losses[-q:]))
        rel = (head - tail) / max(abs(head), 1e-12)
        if not self._episodes["plateau"].starts(rel < self.plateau_tol):
            return None
        return CurveWarning(
            "plateau", step,
            f"plateau: the train loss improved by {rel:.2%} ({_g(head)} -> {_g(tail)}, means of "
            f"{q} rows) over the last {len(win)} logged rows (steps {win[0][0]}-{step}), less "
            f"than plateau_tol {self.plateau_tol:.2%}; the run has converged or "
            f"optimizer.learning_rate is too low")

    def _check_lr(self, step: int) -> Optional[CurveWarning]:
        win = self._lr
        if len(win) < win.maxlen:
            return None
        x = np.asarray(win, np.float64)
        sc = sign_change_fraction(x)
        mean, std = float(np.mean(x)), float(np.std(x))
        cv = std / max(abs(mean), 1e-12)
        h = len(x) // 2
        first, second = float(np.mean(x[:h])), float(np.mean(x[h:]))
        improvement = (first - second) / max(abs(first), 1e-12)
        cond = (sc >= self.lr_sign_changes and cv >= self.lr_cv and std >= self.floor
                and improvement < self.plateau_tol)
        if not self._episodes["lr_too_high"].starts(cond):
            return None
        trend = "rising" if improvement < 0 else "flat"
        return CurveWarning(
            "lr_too_high", step,
            f"the loss oscillates without progress over the last {len(x)} logged rows: "
            f"{sc:.0%} of successive changes flip sign, std/mean {cv:.2f} (std {_g(std)}), "
            f"trend {trend} ({_g(first)} -> {_g(second)}); optimizer.learning_rate is likely "
            f"too high (or the batch too small)")

    # -- evaluation rows ----------------------------------------------------------------------

    def observe_eval(self, row: Mapping[str, Any]) -> list[CurveWarning]:
        """Feeds one evaluation row (`step` and `val_key`; rows without it are ignored)."""
        val = row.get(self.val_key)
        if val is None or self._last_train is None:
            return []
        step, val = int(row["step"]), float(val)
        train = float(np.mean(self._since_eval)) if self._since_eval else self._last_train
        self._since_eval = []
        if not math.isfinite(val):
            return []
        cur, prev = (step, val, train), self._prev_eval
        self._prev_eval = cur
        if prev is None:
            return []
        if val > prev[1] and train < prev[2]:
            if self._streak == 0:
                self._streak_start = prev
            self._streak += 1
        else:
            self._streak = 0
        if not self._episodes["overfitting"].starts(self._streak >= self.overfit_evals):
            return []
        s = self._streak_start
        return [CurveWarning(
            "overfitting", step,
            f"overfitting: {self.val_key} rose for {self._streak} consecutive evaluations "
            f"({_g(s[1])} at step {s[0]} -> {_g(val)}) while the train loss fell "
            f"({_g(s[2])} -> {_g(train)}); consider train.early_stopping_patience / "
            f"train.best_metric, more data or more regularisation")]


def sign_change_fraction(x: Any) -> float:
    """The fraction of successive differences of `x` whose sign flips (zero differences are
    dropped): ~0 for a monotone curve, 2/3 in expectation for i.i.d. noise, 1 for a zig-zag."""
    d = np.diff(np.asarray(x, np.float64))
    s = np.sign(d[d != 0])
    if len(s) < 2:
        return 0.0
    return float(np.mean(s[1:] != s[:-1]))
