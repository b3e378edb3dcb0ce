"""Loss-curve plots (PNG, matplotlib's Agg backend: no display needed) from metric logs.

    curves = read_curves("/tmp/run/finetune/metrics.jsonl", {"train": ("finetune", "loss"),
                                                            "eval": ("finetune_eval", "eval_loss")})
    plot_loss_curves("/tmp/run/loss_curves.png", {"fine-tuning": curves})
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Mapping, Sequence

from ftjax import workdir as workdir_lib

Curve = tuple[list[int], list[float]]  # (steps, values)

__all__ = ["Curve", "read_curve", "read_curves", "plot_loss_curves"]


def read_curve(path: str | os.PathLike[str], split: str, key: str) -> Curve:
    """Steps and values of metric `key` in split `split` of a `metrics.jsonl` (MetricWriter).

    A resumed run appends to the same file, so a step may appear more than once: the last
    record of each step wins, and the curve is sorted by step.
    """
    by_step: dict[int, float] = {}
    with workdir_lib.path(path).open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from None
            if rec.get("split") == split and key in rec:
                by_step[int(rec["step"])] = float(rec[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def read_curves(path: str | os.PathLike[str], wanted: Mapping[str, tuple[str, str]]) -> dict[str, Curve]:
    """`{label: (split, key)}` -> `{label: curve}`, leaving out curves with no points."""
    out = {}
    for label, (split, key) in wanted.items():
        curve = read_curve(path, split, key)
        if curve[0]:
            out[label] = curve
    return out


def plot_loss_curves(path: str | os.PathLike[str], panels: Mapping[str, Mapping[str, Curve | Sequence]],
                     title: str | None = None, log_y: bool | None = None) -> str:
    """Writes one panel per entry of `panels` (`{panel title: {label: (steps, values)}}`).

    Empty panels are skipped; short curves are drawn with markers; non-finite values are
    dropped. `log_y=None` uses a log scale in panels whose positive values span over 20x.
    `path` may be local or a URL (gs://...). Returns `path`.
    """
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    panels = {name: curves for name, curves in panels.items() if curves}
    if not panels:
        raise ValueError(f"plot_loss_curves({path!r}): no curves to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (name, curves) in zip(axes[0], panels.items()):
        drawn = []
        for label, (steps, values) in curves.items():
            pts = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
            if not pts:
                continue
            xs, ys = zip(*pts)
            drawn += ys
            ax.plot(xs, ys, label=label, marker="o" if len(pts) < 30 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / answer token)")
        positive = [v for v in drawn if v > 0]
        use_log = log_y if log_y is not None else (
            len(positive) == len(drawn) and bool(positive) and max(positive) > 20 * min(positive))
        if use_log:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title, wrap=True, fontsize=11)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    out = workdir_lib.path(path)
    workdir_lib.write_bytes(out.parent, out.name, png.getvalue(), all_processes=True)
    return path
