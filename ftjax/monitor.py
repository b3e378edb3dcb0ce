"""Monitoring: metric files (JSON lines + TensorBoard), progress display, throughput and MFU.

Only process 0 writes metric files or prints progress; on other processes these are no-ops,
so the same loop code runs on one CPU and on a pod.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import resource
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import numpy as np

from ftjax import tracking as tracking_lib
from ftjax import workdir as workdir_lib

__all__ = [
    "MetricWriter",
    "Progress",
    "Throughput",
    "transformer_flops_per_token",
    "peak_flops_per_device",
    "peak_rss_mb",
    "format_count",
    "moe_scalars",
]

_RESERVED = ("step", "split", "time")


def _is_primary() -> bool:
    return jax.process_index() == 0


# ------------------------------------------------------------------------------------------
# Metric files.


class MetricWriter:
    """Writes scalar metrics to `workdir/metrics.jsonl` and TensorBoard events in `workdir/tb`.

    Each `write` appends one JSON line `{"step", "split", **metrics, "time"}` and flushes it,
    so a crash loses nothing. Non-finite values are written as Python's json does (NaN,
    Infinity), which `json.loads` and pandas read back. On processes other than 0 every
    method is a no-op. `tracking`: W&B / MLflow settings (`tracking.DEFAULTS`; off by default),
    fed the scalars as `{prefix}/{name}`; `config` is logged to them once (ftjax/tracking.py).
    """

    def __init__(self, workdir: str | os.PathLike[str], *, tensorboard: bool = True,
                 upload_every_s: float = 30.0, tracking: Mapping[str, Any] | None = None,
                 config: Any = None):
        self.workdir = workdir_lib.path(workdir)
        self.enabled = _is_primary()
        # Checked on every process, opened on process 0 only.
        self._trackers = tracking_lib.Trackers(self.workdir, tracking, config,
                                               primary=self.enabled)
        self._file: TextIO | None = None
        self._tb = None
        # Object stores (gs://) cannot append: the whole file is rewritten from memory at most
        # every `upload_every_s` seconds and on flush/close.
        self._remote = workdir_lib.is_remote(self.workdir)
        self._lines: list[str] = []
        self._upload_every_s = upload_every_s
        self._uploaded_at = time.monotonic()
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "metrics.jsonl"
        if self._remote:
            if path.exists():
                self._lines = path.read_text().splitlines(keepends=True)
            self._file = io.StringIO()  # a stand-in that marks the writer open
        else:
            self._file = path.open("a", encoding="utf-8")
        if tensorboard:
            import tensorboardX  # pylint: disable=import-outside-toplevel

            _register_tensorboard_url_writers()
            self._tb = tensorboardX.SummaryWriter(os.fspath(self.workdir / "tb"))

    def _upload(self) -> None:
        (self.workdir / "metrics.jsonl").write_text("".join(self._lines))
        self._uploaded_at = time.monotonic()

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "train", *,
              vectors: Mapping[str, Any] | None = None) -> None:
        """Records `metrics` (scalars or size-1 arrays) at `step` under split `prefix`.

        `vectors`: non-scalar metrics (e.g. MoE per-layer expert load [L, E]), written to the
        JSON line as nested lists and to TensorBoard as histograms. They are passed apart so
        that an array where a scalar was meant still fails loudly.
        """
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricWriter.write called after close()")
        values: dict[str, float] = {}
        arrays: dict[str, np.ndarray] = {}
        for name, value in (vectors or {}).items():
            if name in _RESERVED or name in metrics:
                raise ValueError(f"vector metric name {name!r} is reserved or also a scalar "
                                 "metric; rename it")
            try:
                arrays[name] = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise ValueError(f"vector metric {name!r} at step {step} is not numeric: "
                                 f"{e}") from None
        for name, value in metrics.items():
            if name in _RESERVED:
                raise ValueError(f"metric name {name!r} is reserved ({_RESERVED}); rename it")
            try:
                if hasattr(value, "shape") and getattr(value, "size", 0) == 1:
                    value = np.asarray(value).reshape(())  # size-1 arrays, e.g. shape (1,)
                values[name] = float(value)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"metric {name!r} at step {step} is not a scalar "
                    f"({type(value).__name__}{getattr(value, 'shape', '')}): {e}"
                ) from None
        step = int(step)
        record = {"step": step, "split": prefix, **values,
                  **{k: v.tolist() for k, v in arrays.items()}, "time": time.time()}
        self._append(json.dumps(record) + "\n")
        if self._trackers:
            self._trackers.write_scalars(step, {f"{prefix}/{k}": v for k, v in values.items()})
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(f"{prefix}/{name}", value, step)
            for name, value in arrays.items():
                if value.size and np.all(np.isfinite(value)):
                    self._tb.add_histogram(f"{prefix}/{name}", value.reshape(-1), step)

    def event(self, step: int, kind: str, message: str, prefix: str = "warning") -> None:
        """Records a non-numeric event (e.g. a loss-curve warning) as one JSON line
        `{"step", "split": prefix, "kind", "message", "time"}`; not sent to TensorBoard."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricWriter.event called after close()")
        record = {"step": int(step), "split": prefix, "kind": str(kind),
                  "message": str(message), "time": time.time()}
        self._append(json.dumps(record) + "\n")

    def _append(self, line: str) -> None:
        if self._remote:
            self._lines.append(line)
            if time.monotonic() - self._uploaded_at >= self._upload_every_s:
                self._upload()
        else:
            self._file.write(line)
            self._file.flush()

    def flush(self) -> None:
        """Flushes buffered TensorBoard events and, on object stores, uploads metrics.jsonl.

        Locally the JSON file is flushed on every write, so a crash loses nothing.
        """
        if self._file is not None:
            if self._remote:
                self._upload()
            else:
                self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._trackers.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            if self._remote:
                self._upload()
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _UrlRecordWriter:
    """tensorboardX record writer for URLs (gs://, s3://) through `etils.epath`.

    Object stores have no append: the event file is kept in memory and rewritten whole on
    every flush (as tensorboardX's own S3 writer does).
    """

    def __init__(self, path: str):
        self.path = workdir_lib.path(path)
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _UrlWriterFactory:
    def open(self, path: str) -> _UrlRecordWriter:  # noqa: A003 - tensorboardX's protocol
        return _UrlRecordWriter(path)

    def directory_check(self, path: str) -> None:
        workdir_lib.path(path).mkdir(parents=True, exist_ok=True)


def _register_tensorboard_url_writers() -> None:
    """Routes tensorboardX event files under gs:// (and other epath URLs) through epath."""
    from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel

    for scheme in ("gs", "s3", "az", "hf"):
        record_writer.register_writer_factory(scheme, _UrlWriterFactory())


def moe_scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Per-layer MoE routing metrics as named scalars for TensorBoard and logs.

    Reads `{prefix}moe_<name>` arrays ([L] for aux_loss, z_loss, dropped, entropy; [L, E]
    for load, the fraction of token-assignments each expert got) and returns
    `{prefix}moe/<name>` (mean over layers), `{prefix}moe/<name>/layer{i}` for dropped,
    entropy and aux_loss, and `{prefix}moe/load_max/layer{i}` / `load_min` (ideal: 1/E).
    Empty when there are no MoE metrics.
    """
    out: dict[str, float] = {}
    for name in ("aux_loss", "z_loss", "dropped", "entropy"):
        value = metrics.get(f"{prefix}moe_{name}")
        if value is None:
            continue
        per_layer = np.asarray(value, np.float64).reshape(-1)
        out[f"{prefix}moe/{name}"] = float(per_layer.mean())
        if name != "z_loss":
            for i, x in enumerate(per_layer):
                out[f"{prefix}moe/{name}/layer{i}"] = float(x)
    load = metrics.get(f"{prefix}moe_load")
    if load is not None:
        load = np.asarray(load, np.float64)
        for i, row in enumerate(load.reshape(-1, load.shape[-1])):
            out[f"{prefix}moe/load_max/layer{i}"] = float(row.max())
            out[f"{prefix}moe/load_min/layer{i}"] = float(row.min())
    return out


# ------------------------------------------------------------------------------------------
# Progress display.


def format_count(x: float) -> str:
    """12345 -> '12.3k', 2.5e6 -> '2.5M', 512 -> '512'."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _format_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


def _fmt(value: float) -> str:
    """4 significant figures with trailing zeros kept: 1.000, 2.950, 0.01234, 1.235e+04."""
    return f"{float(value):#.4g}"


class Progress:
    """Progress for a terminal (tqdm bar) and for log files (one compact line per update).

    `update(step, loss=..., tokens_per_s=...)` shows step/total, loss, tokens/s and the ETA.
    The ETA is the wall time per step since the first update (the first step includes
    compilation, so it is left out; before any update, since construction), over the steps
    done in this process (steps before `start_step`, e.g. from a resumed checkpoint, are not
    counted); the first update shows `eta ?`. When stdout is not a TTY it prints every
    `print_every`-th update (and the last step) a line like
    `train step 120/400 loss 1.234 tok/s 12.3k eta 0:01:02`. Values have 4 significant
    figures, trailing zeros kept (`loss 1.000`), so columns line up from line to line.
    Enabled on process 0 by default.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        start_step: int = 0,
        desc: str = "train",
        enabled: bool | None = None,
        print_every: int = 1,
        file: TextIO | None = None,
    ):
        if print_every < 1:
            raise ValueError(f"print_every must be >= 1, got {print_every}")
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.desc = desc
        self.enabled = _is_primary() if enabled is None else bool(enabled)
        self.print_every = print_every
        self._file = file
        self._start = time.perf_counter()
        self._calls = 0
        self._last_step = self.start_step
        self._origin: tuple[float, int] | None = None  # (time, step) of the first update
        self._bar = None
        if self.enabled and self._out().isatty():
            import tqdm  # pylint: disable=import-outside-toplevel

            # smoothing=0: tqdm's rate/ETA is the average since start, like the log line.
            self._bar = tqdm.tqdm(
                total=self.total_steps, initial=self.start_step, desc=desc,
                dynamic_ncols=True, smoothing=0.0, file=self._out(),
            )

    def _out(self) -> TextIO:
        return self._file if self._file is not None else sys.stdout

    def eta_seconds(self, step: int) -> float | None:
        """Seconds left, from the average time per step done in this process so far (since
        the first update, once there was one)."""
        t0, s0 = self._origin or (self._start, self.start_step)
        done = step - s0
        if done <= 0:
            return None
        elapsed = time.perf_counter() - t0
        return elapsed / done * max(self.total_steps - step, 0)

    def line(self, step: int, loss: float | None = None, tokens_per_s: float | None = None,
             **extra: float) -> str:
        """The compact log line for `step`."""
        parts = [f"{self.desc} step {step}/{self.total_steps}"]
        if loss is not None:
            parts.append(f"loss {_fmt(loss)}")
        if tokens_per_s is not None:
            parts.append(f"tok/s {format_count(float(tokens_per_s))}")
        for name, value in extra.items():
            parts.append(f"{name} {_fmt(value)}")
        parts.append(f"eta {_format_eta(self.eta_seconds(step))}")
        return " ".join(parts)

    def update(self, step: int, *, loss: float | None = None,
               tokens_per_s: float | None = None, **extra: float) -> None:
        """Reports that `step` (absolute, counting from 0 or the resumed step) is done."""
        if not self.enabled:
            return
        step = int(step)
        self._calls += 1
        if self._origin is None:  # the ETA clock starts here: the first step compiled
            self._origin = (time.perf_counter(), step)
        if self._bar is not None:
            post: dict[str, str] = {}
            if loss is not None:
                post["loss"] = _fmt(loss)
            if tokens_per_s is not None:
                post["tok/s"] = format_count(float(tokens_per_s))
            post.update({k: _fmt(v) for k, v in extra.items()})
            self._bar.update(step - self._last_step)
            self._bar.set_postfix(post, refresh=True)
        elif self._calls % self.print_every == 0 or step >= self.total_steps:
            print(self.line(step, loss, tokens_per_s, **extra), file=self._out(), flush=True)
        self._last_step = step

    def write(self, message: str) -> None:
        """Prints a line (a warning, a note) without breaking the bar: above it on a terminal,
        as a plain line otherwise. Prints even when the display is disabled (the caller
        decides which process speaks)."""
        if self._bar is not None:
            self._bar.write(message, file=self._out())
        else:
            print(message, file=self._out(), flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------
# FLOPs, peak FLOP/s, throughput.


def transformer_flops_per_token(
    n_params_nonembed: int,
    num_layers: int,
    hidden: int,
    seq_len: int,
    *,
    n_heads: int | None = None,
    head_dim: int | None = None,
    lm_head_params: int = 0,
    training: bool = True,
) -> float:
    """Matmul FLOPs per token of a decoder-only transformer (PaLM, Chowdhery et al. 2022, App. B).

        forward  = 2·(N + P_head) + 4·L·T·A
        training = 3·forward = 6·(N + P_head) + 12·L·T·A

    N = `n_params_nonembed`: parameters of all weight matmuls in the layers (attention
    projections, MLP, experts *active per token* for MoE), excluding the embedding table;
    each costs one multiply-add (2 FLOPs) per token forward.
    P_head = `lm_head_params` = vocab·hidden: the output projection is a matmul even when it
    is tied to the embedding (an embedding lookup is not), so count it here, not in N.
    4·L·T·A: per layer, QKᵀ and attention·V each cost 2·T·A FLOPs per token, with T =
    `seq_len` and A = `n_heads·head_dim` the attention width (default `hidden`; with GQA use
    the number of *query* heads). As in PaLM, the causal mask is not discounted.
    Training counts backward as 2× forward (gradients w.r.t. activations and weights). With
    a frozen base (LoRA) the weight gradients of frozen matmuls are skipped, so real work is
    nearer 4·N than 6·N: `ftjax.train.loop.flops_per_token(adapter_params=...)` counts that
    (docs/performance.md, "FLOP conventions").
    """
    if head_dim is not None and n_heads is None:
        raise ValueError("head_dim given without n_heads; pass both (or neither to use hidden)")
    if n_heads is not None:
        if head_dim is None:
            if hidden % n_heads:
                raise ValueError(f"hidden={hidden} not divisible by n_heads={n_heads}; "
                                 f"pass head_dim")
            head_dim = hidden // n_heads
        attn_width = n_heads * head_dim
    else:
        attn_width = hidden
    forward = 2.0 * (n_params_nonembed + lm_head_params) + 4.0 * num_layers * seq_len * attn_width
    return 3.0 * forward if training else forward


# Peak dense bf16 FLOP/s per device (vendor figures, without sparsity), matched as substrings
# of `device.device_kind`, first match wins (so "v5 lite" precedes "v5").
_PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("tpu v3", 123e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
)

_PEAK_CACHE: dict[str, tuple[float, str]] = {}


def _measure_matmul_flops(device: Any, n: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of a jitted f32 n×n @ n×n matmul on `device`."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    key = jax.random.PRNGKey(0)
    a = jax.device_put(jax.random.normal(key, (n, n), jnp.float32), device)
    b = jax.device_put(jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32), device)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()  # compile + warm up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / max(best, 1e-9)


def peak_flops_per_device(device: Any = None, *, override: float | None = None
                          ) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from).

    Known accelerators come from a table of dense bf16 peaks ("table:<device_kind>"). For CPUs
    and unknown kinds a f32 1024² matmul is timed once per process ("measured-f32-matmul"),
    which makes CPU MFU a rough sanity figure, not a hardware claim. `override` wins.
    """
    if override is not None:
        return float(override), "override"
    if device is None:
        device = jax.devices()[0]
    kind = str(getattr(device, "device_kind", "unknown"))
    cache_key = f"{getattr(device, 'platform', '?')}:{kind}"
    if cache_key in _PEAK_CACHE:
        return _PEAK_CACHE[cache_key]
    low = kind.lower()
    result = None
    for pattern, flops in _PEAK_BF16:
        if pattern in low:
            result = (flops, f"table:{kind}")
            break
    if result is None:
        result = (_measure_matmul_flops(device), "measured-f32-matmul")
    _PEAK_CACHE[cache_key] = result
    return result


class Throughput:
    """Turns (steps, seconds) of an interval into tokens/s, tokens/s/device and MFU.

    MFU = tokens/s · flops_per_token / (peak FLOP/s per device · n_devices). Use
    `transformer_flops_per_token` for `flops_per_token`; the peak defaults to
    `peak_flops_per_device()` for the first local device.
    """

    def __init__(
        self,
        tokens_per_step: float,
        flops_per_token: float,
        *,
        n_devices: int | None = None,
        peak_flops_per_device: float | None = None,
    ):
        self.tokens_per_step = float(tokens_per_step)
        self.flops_per_token = float(flops_per_token)
        self.n_devices = int(n_devices) if n_devices is not None else jax.device_count()
        if self.n_devices < 1:
            raise ValueError(f"n_devices must be >= 1, got {self.n_devices}")
        self._peak = peak_flops_per_device
        self._last: tuple[int, float] | None = None

    @property
    def peak(self) -> float:
        """Peak FLOP/s of one device (looked up or measured on first use)."""
        if self._peak is None:
            self._peak = peak_flops_per_device()[0]
        return self._peak

    def measure(self, steps: float, seconds: float, tokens: float | None = None
                ) -> dict[str, float]:
        """Metrics for an interval of `steps` in `seconds` (`tokens` overrides steps·tokens/step)."""
        if seconds <= 0:
            raise ValueError(f"interval must have positive duration, got {seconds} s")
        n_tokens = steps * self.tokens_per_step if tokens is None else float(tokens)
        tokens_per_s = n_tokens / seconds
        achieved = tokens_per_s * self.flops_per_token
        return {
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.n_devices,
            "steps_per_s": steps / seconds,
            "mfu": achieved / (self.peak * self.n_devices),
        }

    def tick(self, step: int, now: float | None = None) -> dict[str, float] | None:
        """Metrics since the previous `tick` (None on the first call)."""
        now = time.perf_counter() if now is None else now
        last, self._last = self._last, (int(step), now)
        if last is None or step <= last[0] or now <= last[1]:
            return None
        return self.measure(step - last[0], now - last[1])


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def vm_hwm_mb() -> float | None:
    """Peak resident memory in MiB as Linux's /proc/self/status VmHWM reports it (the figure
    that `reset_peak_rss` restarts; ru_maxrss is not reset), or None on other systems."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Restarts the peak-RSS count from the current resident size (Linux: writes 5 to
    /proc/self/clear_refs, which resets VmHWM), so that a later `vm_hwm_mb` measures one phase (e.g. the training steps, not the float32 init a quantized model was
    made from). Returns False where that is not possible (other systems, no permission)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
