"""Server monitoring: Prometheus metrics (parsed back from the exposition), the drift monitor
(hand-computed statistics, shifted synthetic sets, the threshold measurement), the request log;
thread-safety smoke tests for all three."""
import json
import math
import threading

import numpy as np
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ftjax.data import synthetic
from ftjax.data.tokenizer import CharTokenizer
from ftjax.serve import drift as drift_mod
from ftjax.serve.drift import DriftMonitor, DriftReport, format_alert
from ftjax.serve.metrics import ServerMetrics
from ftjax.serve.reqlog import RequestLog

TOK = CharTokenizer()


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------

def _samples(m: ServerMetrics) -> list:
    body, ctype = m.render()
    assert "text/plain" in ctype
    return [s for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]


def _value(samples, name, **labels):
    hits = [s.value for s in samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def _scripted() -> ServerMetrics:
    m = ServerMetrics(slots=4)
    for _ in range(3):
        m.request_started("tiny", "chat")
    m.request_started("tiny", "completions")
    m.request_finished("tiny", "chat", status="ok", latency_s=0.002, prompt_tokens=10,
                       completion_tokens=5, ttft_s=0.001)
    m.request_finished("tiny", "chat", status="ok", latency_s=0.7, prompt_tokens=20,
                       completion_tokens=7, ttft_s=0.3)
    m.error("tiny", "chat", "context_length_exceeded")
    m.request_finished("tiny", "chat", status="error", latency_s=0.0005)
    m.error("nope", "chat", "model_not_found")  # rejected before it started
    m.observe_step(3, 4, 0.01)
    m.observe_step(4, 4, 0.02)
    m.observe_step(0, 4)
    m.set_queue_depth(5)
    m.set_drift("token_js", 0.2, True, threshold=0.04)
    m.set_drift("token_js", 0.01, False)
    m.set_drift("length_psi", 0.5, True)
    return m


def test_metrics_after_a_scripted_sequence():
    s = _samples(_scripted())
    p = "ftjax_serve_"
    assert _value(s, p + "requests_total", model="tiny", endpoint="chat", status="ok") == 2
    assert _value(s, p + "requests_total", model="tiny", endpoint="chat", status="error") == 1
    assert _value(s, p + "errors_total", model="tiny", code="context_length_exceeded") == 1
    assert _value(s, p + "errors_total", model="nope", code="model_not_found") == 1
    assert _value(s, p + "requests_in_flight", endpoint="chat") == 0
    assert _value(s, p + "requests_in_flight", endpoint="completions") == 1
    lat = p + "request_latency_seconds"
    assert _value(s, lat + "_count", endpoint="chat", status="ok") == 2
    assert _value(s, lat + "_sum", endpoint="chat", status="ok") == pytest.approx(0.702)
    assert _value(s, lat + "_bucket", status="ok", le="0.001") == 0
    assert _value(s, lat + "_bucket", status="ok", le="0.0025") == 1
    assert _value(s, lat + "_bucket", status="ok", le="0.5") == 1
    assert _value(s, lat + "_bucket", status="ok", le="1.0") == 2
    assert _value(s, lat + "_bucket", status="ok", le="60.0") == 2
    assert _value(s, lat + "_bucket", status="ok", le="+Inf") == 2
    assert _value(s, lat + "_count", status="error") == 1
    assert _value(s, lat + "_bucket", status="error", le="0.001") == 1
    ttft = p + "time_to_first_token_seconds"
    assert _value(s, ttft + "_count", endpoint="chat") == 2
    assert _value(s, ttft + "_sum", endpoint="chat") == pytest.approx(0.301)
    assert _value(s, p + "prompt_tokens_total", endpoint="chat") == 30
    assert _value(s, p + "completion_tokens_total", endpoint="chat") == 12
    assert _value(s, p + "request_completion_tokens_count", endpoint="chat") == 2  # ok only
    assert _value(s, p + "request_completion_tokens_sum", endpoint="chat") == 12
    assert _value(s, p + "request_prompt_tokens_bucket", endpoint="chat", le="16.0") == 1
    # Batch occupancy: steps at 3/4, 4/4, 0/4.
    assert _value(s, p + "decode_steps_total") == 3
    assert _value(s, p + "batch_slots") == 4
    assert _value(s, p + "batch_active_slots") == 0
    assert _value(s, p + "batch_occupancy") == 0
    occ = p + "batch_occupancy_ratio"
    assert _value(s, occ + "_count") == 3
    assert _value(s, occ + "_sum") == pytest.approx(1.75)
    assert _value(s, occ + "_bucket", le="0.1") == 1
    assert _value(s, occ + "_bucket", le="0.7") == 1
    assert _value(s, occ + "_bucket", le="0.8") == 2
    assert _value(s, occ + "_bucket", le="1.0") == 3
    assert _value(s, p + "decode_step_seconds_count") == 2
    assert _value(s, p + "decode_step_seconds_sum") == pytest.approx(0.03)
    assert _value(s, p + "queue_depth") == 5
    # Drift: the latest value and alert state, and a count of alerting checks.
    assert _value(s, "ftjax_drift_value", statistic="token_js") == pytest.approx(0.01)
    assert _value(s, "ftjax_drift_alert", statistic="token_js") == 0
    assert _value(s, "ftjax_drift_alerts_total", statistic="token_js") == 1
    assert _value(s, "ftjax_drift_threshold", statistic="token_js") == pytest.approx(0.04)
    assert _value(s, "ftjax_drift_value", statistic="length_psi") == 0.5
    assert _value(s, "ftjax_drift_alert", statistic="length_psi") == 1
    assert _value(s, "ftjax_drift_alerts_total", statistic="length_psi") == 1


def test_two_instances_do_not_clash_nor_touch_the_global_registry():
    a, b = ServerMetrics(), ServerMetrics(slots=2)
    a.request_started("m", "chat")
    a.request_finished("m", "chat", status="ok", latency_s=0.1, completion_tokens=3)
    sa, sb = _samples(a), _samples(b)
    assert _value(sa, "ftjax_serve_requests_total", status="ok") == 1
    assert not [x for x in sb if x.name == "ftjax_serve_requests_total"]
    assert _value(sb, "ftjax_serve_batch_slots") == 2
    assert _value(sa, "ftjax_serve_batch_slots") == 0
    global_body = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "ftjax_" not in global_body
    # An explicit registry is used as given.
    reg = prometheus_client.CollectorRegistry()
    c = ServerMetrics(reg)
    c.set_queue_depth(7)
    assert "ftjax_serve_queue_depth 7.0" in prometheus_client.generate_latest(reg).decode()


def test_metrics_reject_bad_values():
    m = ServerMetrics()
    with pytest.raises(ValueError, match="status"):
        m.request_finished("m", "chat", status="timeout", latency_s=1.0)
    with pytest.raises(ValueError, match="latency_s"):
        m.request_finished("m", "chat", status="ok", latency_s=-1.0)
    with pytest.raises(ValueError, match="active_slots"):
        m.observe_step(5, 4)
    with pytest.raises(ValueError, match="active_slots"):
        m.observe_step(0, 0)
    with pytest.raises(ValueError, match="queue depth"):
        m.set_queue_depth(-1)


def test_metrics_thread_safety():
    m = ServerMetrics(slots=8)

    def work():
        for i in range(500):
            m.request_started("m", "chat")
            m.observe_step(i % 9, 8, 0.001)
            m.request_finished("m", "chat", status="ok", latency_s=0.01, prompt_tokens=2,
                               completion_tokens=1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = _samples(m)
    assert _value(s, "ftjax_serve_requests_total", status="ok") == 4000
    assert _value(s, "ftjax_serve_requests_in_flight") == 0
    assert _value(s, "ftjax_serve_prompt_tokens_total") == 8000
    assert _value(s, "ftjax_serve_request_latency_seconds_count", status="ok") == 4000
    assert _value(s, "ftjax_serve_decode_steps_total") == 4000


# ------------------------------------------------------------------------------------------
# Drift statistics by hand
# ------------------------------------------------------------------------------------------

def _kl2(x, y):
    return sum(a * math.log2(a / b) for a, b in zip(x, y) if a > 0)


def _js_by_hand(p, q):
    p = [v / sum(p) for v in p]
    q = [v / sum(q) for v in q]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return 0.5 * _kl2(p, m) + 0.5 * _kl2(q, m)


def test_js_divergence_by_hand():
    assert drift_mod.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert drift_mod.js_divergence([0.2, 0.8], [0.2, 0.8]) == pytest.approx(0.0, abs=1e-12)
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4);
    # KL(p||m) = 1/2 log2(2/3) + 1/2 log2(2), KL(q||m) = log2(4/3); JS = their mean = 0.311278.
    expected = 0.5 * (0.5 * math.log2(2 / 3) + 0.5) + 0.5 * math.log2(4 / 3)
    assert expected == pytest.approx(0.3112781, abs=1e-7)
    assert drift_mod.js_divergence([0.5, 0.5], [1, 0]) == pytest.approx(expected)
    assert drift_mod.js_divergence([1, 1], [4, 0]) == pytest.approx(expected)  # normalised


def test_token_js_smooths_over_the_union_of_observed_cells():
    ref = [2, 0, 0, 2]  # cells 0 and 3
    win = [0, 2, 0, 0]  # cell 1; cell 2 is seen by neither and stays out of the support
    # Support {0, 1, 3}, +0.5 each: p = (2.5, 0.5, 2.5) / 5.5, q = (0.5, 2.5, 0.5) / 3.5.
    expected = _js_by_hand([2.5, 0.5, 2.5], [0.5, 2.5, 0.5])
    assert drift_mod.token_js(ref, win) == pytest.approx(expected)
    assert drift_mod.token_js(ref, win, smoothing=0.0) == pytest.approx(1.0)


def test_psi_and_length_bins_by_hand():
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5) = 0.25 ln 2 + 0.25 ln 1.5
    assert drift_mod.psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.25 * math.log(3), abs=1e-12)
    assert drift_mod.psi([1, 1], [1, 3]) == pytest.approx(0.2746531, abs=1e-7)
    with pytest.raises(ValueError, match="smooth"):
        drift_mod.psi([1, 0], [1, 1])
    ref = list(range(1, 11))
    # Quartiles of 1..10 (linear): 3.25, 5.5, 7.75 -> bins {1,2,3} {4,5} {6,7} {8,9,10}.
    edges = drift_mod.length_bin_edges(ref, bins=4)
    np.testing.assert_allclose(edges, [3.25, 5.5, 7.75])
    win = [1, 1, 10, 10]  # counts (2, 0, 0, 2)
    p = [v / 12 for v in (3.5, 2.5, 2.5, 3.5)]  # (3, 2, 2, 3) + 0.5
    q = [v / 6 for v in (2.5, 0.5, 0.5, 2.5)]  # (2, 0, 0, 2) + 0.5
    expected = sum((b - a) * math.log(b / a) for a, b in zip(p, q))
    assert drift_mod.length_psi(ref, win, bins=4) == pytest.approx(expected)
    # Tied lengths merge quantile edges; right-closed bins.
    np.testing.assert_allclose(drift_mod.length_bin_edges([5] * 9 + [9], bins=10), [5, 5.4])


# ------------------------------------------------------------------------------------------
# Drift on synthetic sets
# ------------------------------------------------------------------------------------------

def _prompts(tasks, n_per_task, seed):
    return [TOK.encode(e["prompt"]) for e in synthetic.mixture(tasks, n_per_task, seed)]


@pytest.fixture(scope="module")
def reference():
    return _prompts(synthetic.PRETRAIN_TASKS, 400, seed=0)  # 2000 prompts


@pytest.fixture(scope="module")
def same():
    # Other draws of the same mixture (not de-duplicated against the reference: lookup has
    # few distinct prompts, and dropping the repeats would itself shift the distribution).
    return _prompts(synthetic.PRETRAIN_TASKS, 400, seed=1)


def _window_report(reference, window, **kw) -> DriftReport:
    mon = DriftMonitor(reference, window=len(window), min_samples=len(window), **kw)
    reports = [mon.observe(p) for p in window]
    assert all(r is None for r in reports[:-1])
    assert reports[-1] == mon.report()
    return reports[-1]


def test_same_distribution_does_not_alert(reference, same):
    for n in (32, 64, 256):
        r = _window_report(reference, same[:n])
        assert not r.alert, r
        assert r.reasons == ()
        assert r.token_js_floor > 0 and abs(r.token_js - r.token_js_floor) < 0.02


def test_heldout_tasks_alert_on_tokens(reference):
    r = _window_report(reference, _prompts(synthetic.HELDOUT_TASKS, 60, seed=1)[:256])
    assert r.alert and r.token_js_alert, r
    assert any(x.startswith("token_js") for x in r.reasons)


def test_digits_instead_of_letters_alert(reference):
    rng = np.random.default_rng(0)
    letters = [TOK.encode("".join(rng.choice(list("abcdefghij"), size=int(k))))
               for k in rng.integers(8, 20, 300)]
    digits = [TOK.encode("".join(rng.choice(list("0123456789"), size=int(k))))
              for k in rng.integers(8, 20, 64)]
    r = _window_report(letters[:200], digits)
    assert r.token_js > 0.9 and r.token_js_alert and not r.length_psi_alert, r
    assert not _window_report(letters[:200], letters[200:264]).alert


def test_length_shift_alerts_on_psi_only(reference):
    twice = [TOK.encode(e["prompt"] + " " + e["prompt"])
             for e in synthetic.mixture(synthetic.PRETRAIN_TASKS, 60, seed=1)[:256]]
    r = _window_report(reference, twice)
    assert r.alert and r.length_psi_alert and not r.token_js_alert, r
    assert r.length_psi > 1.0
    assert r.reasons == (f"length_psi {r.length_psi:.3f} > 0.25",)
    line = format_alert(r)
    assert line.startswith("DRIFT ALERT") and "\n" not in line and "length_psi" in line


def test_threshold_measurement(reference, same):
    """The measurement behind token_js_threshold = 0.04 (drift.py docstring): excess JS over
    the no-drift level, and PSI, for one window of each set at the first check (32 prompts)
    and a full window (256)."""
    sets = {
        "same mixture": same,
        "held-out tasks": _prompts(synthetic.HELDOUT_TASKS, 60, seed=1),
        "1 of 5 tasks -> upper": _prompts(synthetic.PRETRAIN_TASKS[:4] + ("upper",), 60, 1),
        "each prompt twice": [TOK.encode(e["prompt"] + " " + e["prompt"]) for e in
                              synthetic.mixture(synthetic.PRETRAIN_TASKS, 60, seed=1)],
    }
    rows = {}
    for name, prompts in sets.items():
        for n in (32, 256):
            r = _window_report(reference, prompts[:n])
            rows[name, n] = r
            print(f"{name:22s} n={n:3d} token_js={r.token_js:.4f} floor={r.token_js_floor:.4f} "
                  f"excess={r.token_js - r.token_js_floor:.4f} length_psi={r.length_psi:.3f} "
                  f"alert={r.alert}")
    excess = {k: r.token_js - r.token_js_floor for k, r in rows.items()}
    th = DriftMonitor(reference).token_js_threshold
    assert th == 0.04
    assert max(excess["same mixture", 32], excess["same mixture", 256]) < th / 2
    assert min(excess["held-out tasks", 32], excess["held-out tasks", 256]) > th
    assert excess["1 of 5 tasks -> upper", 256] > excess["same mixture", 256] + 0.02
    assert excess["each prompt twice", 256] < th / 2
    assert rows["each prompt twice", 256].length_psi > 0.25 > rows["same mixture", 256].length_psi


def test_observe_cadence_and_window(reference, same):
    mon = DriftMonitor(reference, window=64, min_samples=16, check_every=8)
    assert mon.report() is None
    due = [i + 1 for i, p in enumerate(same[:100]) if mon.observe(p) is not None]
    assert due == [16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96]
    r = mon.report()
    assert r.n == 64 and mon.seen == 100
    # The window holds the last 64 prompts: the same report as a monitor fed only those.
    fresh = _window_report(reference, same[36:100])
    assert (r.token_js, r.length_psi) == pytest.approx((fresh.token_js, fresh.length_psi))


def test_monitor_rejects_bad_settings(reference):
    with pytest.raises(ValueError, match="non-empty reference"):
        DriftMonitor([])
    with pytest.raises(ValueError, match="min_samples"):
        DriftMonitor(reference, window=16, min_samples=32)
    with pytest.raises(ValueError, match="negative token id"):
        DriftMonitor(reference).observe([3, -1])
    with pytest.raises(ValueError, match="without an alert"):
        format_alert(DriftReport(32, 0.0, 0.0, False, ()))


def test_drift_thread_safety(reference, same):
    mon = DriftMonitor(reference)  # window 256, first report at 32, then every 32
    results = []

    def work(k):
        out = [mon.observe(same[(k * 37 + i) % len(same)]) for i in range(200)]
        results.extend(r for r in out if r is not None)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mon.seen == 1600
    assert len(results) == 1 + (1600 - 32) // 32
    assert len(mon._win) == 256
    recount = np.bincount(np.concatenate(list(mon._win)), minlength=mon.token_buckets)
    np.testing.assert_array_equal(mon._win_counts, recount)
    assert not mon.report().alert


def test_from_jsonl(tmp_path):
    path = tmp_path / "ref.jsonl"
    lines = [{"prompt": "add 1+2", "answer": "3"},
             {"messages": [{"role": "user", "content": "hello"},
                           {"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]},
             {"text": "ignored", "prompt": "sort abc"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    mon = DriftMonitor.from_jsonl(path, TOK, min_samples=1, window=4)
    assert mon.reference_size == 3
    np.testing.assert_allclose(sorted(mon._ref_lengths), [7, 8, 8])  # "hello\nhi" is 8
    assert drift_mod.messages_text(lines[1]["messages"]) == "hello\nhi"
    by_text = DriftMonitor.from_jsonl(path, TOK, text_fn=lambda o: o.get("text", "x"))
    assert by_text.reference_size == 3
    path.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"ref\.jsonl:2: not valid JSON"):
        DriftMonitor.from_jsonl(path, TOK)
    path.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"ref\.jsonl:1: no string field 'prompt'"):
        DriftMonitor.from_jsonl(path, TOK)


# ------------------------------------------------------------------------------------------
# Request log
# ------------------------------------------------------------------------------------------

RECORD = {"endpoint": "/v1/chat/completions", "model": "tiny", "status": "ok",
          "prompt_tokens": np.int64(12), "completion_tokens": 3, "latency_s": 0.25,
          "prompt": "secret prompt", "messages": [{"role": "user", "content": "secret"}],
          "completion": ["secret answer"], "choices": [{"completion": "secret", "index": 0}]}


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_request_log_hides_text_by_default(tmp_path):
    path = tmp_path / "logs" / "requests.jsonl"
    log = RequestLog(str(path))
    log.write(RECORD)
    log.write({"status": "error", "time": 123.0})
    log.close()
    log.write(RECORD)  # after close: a no-op
    first, second = _lines(path)
    assert "secret" not in path.read_text()
    assert set(first) == {"endpoint", "model", "status", "prompt_tokens", "completion_tokens",
                          "latency_s", "choices", "time"}
    assert first["prompt_tokens"] == 12 and first["choices"] == [{"index": 0}]
    assert isinstance(first["time"], float) and first["time"] > 1e9
    assert second == {"status": "error", "time": 123.0}
    assert "prompt" in RECORD  # the caller's dict is not modified


def test_request_log_keeps_text_when_enabled(tmp_path):
    path = tmp_path / "requests.jsonl"
    with RequestLog(path, log_prompts=True) as log:
        log.write(RECORD)
    (rec,) = _lines(path)
    assert rec["prompt"] == "secret prompt" and rec["completion"] == ["secret answer"]
    assert rec["messages"] == [{"role": "user", "content": "secret"}]
    # Appends to an existing log.
    with RequestLog(path) as log:
        log.write({"status": "ok"})
    assert len(_lines(path)) == 2


def test_request_log_none_is_a_noop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = RequestLog(None)
    assert not log.enabled
    log.write(RECORD)
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_request_log_thread_safety(tmp_path):
    path = tmp_path / "requests.jsonl"
    log = RequestLog(path)

    def work(k):
        for i in range(200):
            log.write({"thread": k, "i": i, "pad": "x" * 500, "prompt": "p"})

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    recs = _lines(path)
    assert len(recs) == 1600
    assert sorted((r["thread"], r["i"]) for r in recs) == [(k, i) for k in range(8)
                                                           for i in range(200)]
