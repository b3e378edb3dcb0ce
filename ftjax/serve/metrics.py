"""Prometheus metrics of the server, rendered for `GET /metrics`.

`ServerMetrics` owns its own `prometheus_client.CollectorRegistry` (never the process-global
one), so several servers - or tests - can live in one process. The server calls:

    m.request_started(model, endpoint)                       # request accepted
    m.error(model, endpoint, "context_length_exceeded")      # on each failure, its code
    m.request_finished(model, endpoint, status="ok" | "error", latency_s=..., prompt_tokens=...,
                       completion_tokens=..., ttft_s=...)    # exactly once per started request
    m.observe_step(active_slots, total_slots, step_s)        # each batched decode step
    m.set_queue_depth(n)                                     # requests waiting for a slot
    m.set_drift("token_js", value, alert)                    # each drift check
    body, content_type = m.render()                          # GET /metrics

Metrics (docs/serving_monitoring.md says what each one means):

    ftjax_serve_requests_total{model,endpoint,status}            counter
    ftjax_serve_errors_total{model,endpoint,code}                counter
    ftjax_serve_requests_in_flight{model,endpoint}               gauge
    ftjax_serve_request_latency_seconds{model,endpoint,status}   histogram, 1 ms .. 60 s
    ftjax_serve_time_to_first_token_seconds{model,endpoint}      histogram, 1 ms .. 60 s
    ftjax_serve_prompt_tokens_total{model,endpoint}              counter
    ftjax_serve_completion_tokens_total{model,endpoint}          counter
    ftjax_serve_request_prompt_tokens{model,endpoint}            histogram (per request)
    ftjax_serve_request_completion_tokens{model,endpoint}        histogram (per request)
    ftjax_serve_batch_slots                                      gauge (decode batch size)
    ftjax_serve_batch_active_slots                               gauge (busy slots, last step)
    ftjax_serve_batch_occupancy                                  gauge (active / total, last step)
    ftjax_serve_batch_occupancy_ratio                            histogram (per decode step)
    ftjax_serve_decode_steps_total                               counter
    ftjax_serve_decode_step_seconds                              histogram, 0.1 ms .. 10 s
    ftjax_serve_queue_depth                                      gauge
    ftjax_drift_value{statistic}                                 gauge (latest drift statistic)
    ftjax_drift_threshold{statistic}                             gauge (when given to set_drift)
    ftjax_drift_alert{statistic}                                 gauge (1 while over threshold)
    ftjax_drift_alerts_total{statistic}                          counter (checks that alerted)

Every method is thread-safe (prometheus_client's metrics are). Bad values - a status other
than "ok"/"error", negative counts or durations, more active slots than slots - raise
ValueError: they are bugs in the caller.
"""

from __future__ import annotations

import math

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ServerMetrics", "LATENCY_BUCKETS", "STEP_BUCKETS", "OCCUPANCY_BUCKETS",
           "TOKEN_BUCKETS", "STATUSES"]

PREFIX = "ftjax_serve_"
DRIFT_PREFIX = "ftjax_drift_"
STATUSES = ("ok", "error")

# Request latency and time to first token: 1 ms .. 60 s, roughly 1-2.5-5 per decade.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 20.0, 30.0, 60.0)
# One batched decode step: 0.1 ms .. 10 s.
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0, 10.0)
# Fraction of decode slots busy in a step: tenths (0.1 .. 1.0).
OCCUPANCY_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))
# Tokens in one request's prompt or completion: powers of two, 1 .. 128k.
TOKEN_BUCKETS = tuple(float(2 ** i) for i in range(0, 18))


def _check_nonneg(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


class ServerMetrics:
    """The server's Prometheus metrics, in a registry of their own (module docstring)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, slots: int = 0) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        req = ("model", "endpoint")
        self.requests = Counter(PREFIX + "requests", "Finished requests, by status (ok or error).",
                                req + ("status",), registry=r)
        self.errors = Counter(PREFIX + "errors", "Failed requests, by error code.",
                              req + ("code",), registry=r)
        self.in_flight = Gauge(PREFIX + "requests_in_flight",
                               "Requests accepted and not yet finished.", req, registry=r)
        self.latency = Histogram(PREFIX + "request_latency_seconds",
                                 "Request latency from acceptance to the last byte, seconds.",
                                 req + ("status",), buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Time from acceptance to the first generated token, seconds.",
                              req, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished "
                                     "requests.", req, registry=r)
        self.completion_tokens = Counter(PREFIX + "completion_tokens", "Generated tokens of "
                                         "finished requests.", req, registry=r)
        self.request_prompt_tokens = Histogram(
            PREFIX + "request_prompt_tokens", "Prompt tokens per finished request.", req,
            buckets=TOKEN_BUCKETS, registry=r)
        self.request_completion_tokens = Histogram(
            PREFIX + "request_completion_tokens", "Generated tokens per finished request.", req,
            buckets=TOKEN_BUCKETS, registry=r)
        self.slots = Gauge(PREFIX + "batch_slots", "Decode slots of the batching engine.",
                           registry=r)
        self.active_slots = Gauge(PREFIX + "batch_active_slots",
                                  "Decode slots busy in the last step.", registry=r)
        self.occupancy = Gauge(PREFIX + "batch_occupancy",
                               "Fraction of decode slots busy in the last step.", registry=r)
        self.occupancy_hist = Histogram(PREFIX + "batch_occupancy_ratio",
                                        "Fraction of decode slots busy, per decode step.",
                                        buckets=OCCUPANCY_BUCKETS, registry=r)
        self.decode_steps = Counter(PREFIX + "decode_steps", "Batched decode steps run.",
                                    registry=r)
        self.step_seconds = Histogram(PREFIX + "decode_step_seconds",
                                      "Wall time of one batched decode step, seconds.",
                                      buckets=STEP_BUCKETS, registry=r)
        self.queue_depth = Gauge(PREFIX + "queue_depth", "Requests waiting for a decode slot.",
                                 registry=r)
        self.drift_value = Gauge(DRIFT_PREFIX + "value", "Latest value of a prompt drift "
                                 "statistic (token_js: JS divergence, bits; length_psi: PSI).",
                                 ("statistic",), registry=r)
        self.drift_threshold = Gauge(DRIFT_PREFIX + "threshold", "Alert threshold of a drift "
                                     "statistic.", ("statistic",), registry=r)
        self.drift_alert = Gauge(DRIFT_PREFIX + "alert", "1 while the latest check of a drift "
                                 "statistic alerted, else 0.", ("statistic",), registry=r)
        self.drift_alerts = Counter(DRIFT_PREFIX + "alerts", "Drift checks that alerted, per "
                                    "statistic.", ("statistic",), registry=r)
        if slots < 0:
            raise ValueError(f"slots must be >= 0, got {slots}")
        self.slots.set(slots)

    # ------------------------------------------------------------------------- requests

    def request_started(self, model: str, endpoint: str) -> None:
        """A request was accepted: in-flight +1."""
        self.in_flight.labels(model, endpoint).inc()

    def request_finished(self, model: str, endpoint: str, *, status: str, latency_s: float,
                         prompt_tokens: int = 0, completion_tokens: int = 0,
                         ttft_s: float | None = None) -> None:
        """A started request ended (status "ok" or "error"): in-flight -1, counts, latency."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        latency_s = _check_nonneg("latency_s", latency_s)
        prompt_tokens = int(_check_nonneg("prompt_tokens", prompt_tokens))
        completion_tokens = int(_check_nonneg("completion_tokens", completion_tokens))
        self.in_flight.labels(model, endpoint).dec()
        self.requests.labels(model, endpoint, status).inc()
        self.latency.labels(model, endpoint, status).observe(latency_s)
        if ttft_s is not None:
            self.ttft.labels(model, endpoint).observe(_check_nonneg("ttft_s", ttft_s))
        self.prompt_tokens.labels(model, endpoint).inc(prompt_tokens)
        self.completion_tokens.labels(model, endpoint).inc(completion_tokens)
        if status == "ok":
            self.request_prompt_tokens.labels(model, endpoint).observe(prompt_tokens)
            self.request_completion_tokens.labels(model, endpoint).observe(completion_tokens)

    def error(self, model: str, endpoint: str, code: str) -> None:
        """Count one failure by its code ("model_not_found", "invalid_json", ...).

        Independent of `request_finished`: a request that was started and failed gets both
        (status="error" there); one rejected before it started gets only this.
        """
        if not code:
            raise ValueError("error code must be a non-empty string")
        self.errors.labels(model, endpoint, code).inc()

    # ----------------------------------------------------------------------------- engine

    def observe_step(self, active_slots: int, total_slots: int,
                     step_s: float | None = None) -> None:
        """One batched decode step with `active_slots` of `total_slots` busy."""
        if total_slots <= 0 or not 0 <= active_slots <= total_slots:
            raise ValueError(f"need 0 <= active_slots <= total_slots and total_slots > 0, got "
                             f"{active_slots} of {total_slots}")
        ratio = active_slots / total_slots
        self.slots.set(total_slots)
        self.active_slots.set(active_slots)
        self.occupancy.set(ratio)
        self.occupancy_hist.observe(ratio)
        self.decode_steps.inc()
        if step_s is not None:
            self.step_seconds.observe(_check_nonneg("step_s", step_s))

    def set_queue_depth(self, n: int) -> None:
        """Requests waiting for a decode slot now."""
        self.queue_depth.set(_check_nonneg("queue depth", n))

    # ------------------------------------------------------------------------------ drift

    def set_drift(self, statistic: str, value: float, alert: bool,
                  threshold: float | None = None) -> None:
        """The latest value of a drift statistic ("token_js", "length_psi"); counts alerts.

        `DriftReport.statistics()` yields the (statistic, value, alert) triples.
        """
        if not statistic:
            raise ValueError("statistic must be a non-empty name")
        self.drift_value.labels(statistic).set(float(value))
        self.drift_alert.labels(statistic).set(1.0 if alert else 0.0)
        if threshold is not None:
            self.drift_threshold.labels(statistic).set(float(threshold))
        if alert:
            self.drift_alerts.labels(statistic).inc()
        else:
            self.drift_alerts.labels(statistic)  # export the series at 0 from the first check

    # ----------------------------------------------------------------------------- output

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition, for `GET /metrics`."""
        body = prometheus_client.generate_latest(self.registry)
        return body, prometheus_client.CONTENT_TYPE_LATEST
