"""Tests for ftjax.monitor: metric files, progress lines, FLOPs formula, MFU arithmetic."""

import io
import json
import math
import re

import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import monitor


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
    with monitor.MetricWriter(tmp_path / "wd") as w:
        w.write(1, {"loss": jnp.asarray(2.5), "lr": np.float32(1e-3)})
        w.write(2, {"loss": 2.0, "grad_norm": float("nan")})
        w.write(2, {"accuracy": np.array([0.75])}, prefix="eval")
    lines = (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["step"] for r in recs] == [1, 2, 2]
    assert [r["split"] for r in recs] == ["train", "train", "eval"]
    assert recs[0]["loss"] == 2.5 and recs[0]["lr"] == pytest.approx(1e-3)
    assert math.isnan(recs[1]["grad_norm"])
    assert recs[2]["accuracy"] == 0.75
    assert all(isinstance(r["time"], float) for r in recs)
    events = list((tmp_path / "wd" / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_metric_writer_appends_across_instances(tmp_path):
    for step in (1, 2):
        with monitor.MetricWriter(tmp_path, tensorboard=False) as w:
            w.write(step, {"loss": 1.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert not (tmp_path / "tb").exists()


def test_metric_writer_rejects_bad_values(tmp_path):
    with monitor.MetricWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="'vec'.*not a scalar"):
            w.write(1, {"vec": np.ones(3)})
        with pytest.raises(ValueError, match="'step'.*reserved"):
            w.write(1, {"step": 1.0})


def test_progress_prints_line_when_not_tty(capsys):
    p = monitor.Progress(400, start_step=100, desc="train")
    p.update(101, loss=2.95, tokens_per_s=12345.0)  # the first step: compiled, so no ETA
    p.update(120, loss=1.2345, tokens_per_s=12345.0)
    p.update(130, loss=1.0, moe_aux=0.5)
    p.close()
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "train step 101/400 loss 2.950 tok/s 12.3k eta ?", out
    assert re.fullmatch(
        r"train step 120/400 loss 1\.234 tok/s 12\.3k eta \d+:\d\d:\d\d", out[1]
    ), out
    assert re.fullmatch(r"train step 130/400 loss 1\.000 moe_aux 0\.5000 eta \S+", out[2]), out


def test_progress_eta_ignores_start_step_and_print_every():
    buf = io.StringIO()
    p = monitor.Progress(1000, start_step=900, print_every=2, file=buf, enabled=True)
    p._start -= 10.0  # pretend 10 s have passed
    # 50 steps done in this process in 10 s -> 50 remaining steps take 10 s.
    assert p.eta_seconds(950) == pytest.approx(10.0, rel=0.05)
    p.update(950, loss=1.0)
    assert buf.getvalue() == ""  # first call skipped with print_every=2
    p.update(960, loss=1.0)
    p.update(1000, loss=0.5)  # the last step always prints
    lines = buf.getvalue().splitlines()
    assert [ln.split()[2] for ln in lines] == ["960/1000", "1000/1000"]
    assert lines[-1].endswith("eta 0:00:00")


def test_progress_disabled_is_silent(capsys):
    p = monitor.Progress(10, enabled=False)
    p.update(5, loss=1.0)
    assert capsys.readouterr().out == ""


def test_format_count():
    assert monitor.format_count(512) == "512"
    assert monitor.format_count(12345) == "12.3k"
    assert monitor.format_count(2.5e6) == "2.5M"


def test_flops_per_token_worked_example():
    # N=1000 non-embedding params, L=2 layers, D=8 hidden, T=16 tokens, V=10 vocab.
    # forward = 2*(1000 + 10*8) + 4*2*16*8 = 2160 + 1024 = 3184; training = 3*3184 = 9552.
    fwd = monitor.transformer_flops_per_token(1000, 2, 8, 16, lm_head_params=80,
                                              training=False)
    assert fwd == 3184
    assert monitor.transformer_flops_per_token(1000, 2, 8, 16, lm_head_params=80) == 9552
    # PaLM's 6N + 12·L·H·Q·T with an explicit attention width (4 heads of 4 = 16 != D).
    got = monitor.transformer_flops_per_token(1000, 2, 8, 16, n_heads=4, head_dim=4)
    assert got == 6 * 1000 + 12 * 2 * 4 * 4 * 16
    # n_heads alone uses head_dim = hidden / n_heads, i.e. width D.
    assert monitor.transformer_flops_per_token(1000, 2, 8, 16, n_heads=2) == 6 * 1000 + 12 * 2 * 16 * 8
    with pytest.raises(ValueError, match="head_dim"):
        monitor.transformer_flops_per_token(1000, 2, 8, 16, head_dim=4)


def test_peak_flops_table_override_and_cpu_measurement():
    class Fake:
        platform = "tpu"
        device_kind = "TPU v5 lite"

    assert monitor.peak_flops_per_device(Fake()) == (197e12, "table:TPU v5 lite")
    Fake.device_kind = "TPU v5"
    assert monitor.peak_flops_per_device(Fake())[0] == 459e12
    Fake.platform, Fake.device_kind = "gpu", "NVIDIA H100 80GB HBM3"
    assert monitor.peak_flops_per_device(Fake())[0] == 989e12
    assert monitor.peak_flops_per_device(override=1e12) == (1e12, "override")
    flops, source = monitor.peak_flops_per_device()  # the CPU test machine
    assert source == "measured-f32-matmul" and 1e7 < flops < 1e15
    assert monitor.peak_flops_per_device() == (flops, source)  # cached per process


def test_throughput_mfu_arithmetic():
    t = monitor.Throughput(tokens_per_step=1024, flops_per_token=6e6, n_devices=4,
                           peak_flops_per_device=1e12)
    m = t.measure(steps=10, seconds=2.0)
    # 10 steps * 1024 tokens / 2 s = 5120 tok/s; achieved 5120 * 6e6 = 3.072e10 FLOP/s
    # over 4 devices * 1e12 peak -> MFU 0.00768.
    assert m["tokens_per_s"] == pytest.approx(5120.0)
    assert m["tokens_per_s_per_device"] == pytest.approx(1280.0)
    assert m["steps_per_s"] == pytest.approx(5.0)
    assert m["mfu"] == pytest.approx(0.00768)
    assert t.measure(1, 1.0, tokens=500)["tokens_per_s"] == 500
    assert t.tick(0, now=100.0) is None
    assert t.tick(10, now=102.0)["mfu"] == pytest.approx(0.00768)
    with pytest.raises(ValueError):
        t.measure(1, 0.0)


def test_peak_rss_mb_is_plausible():
    rss = monitor.peak_rss_mb()
    assert 1.0 < rss < 1e6


def test_metric_writer_on_a_bucket_rewrites_instead_of_appending(tmp_path, monkeypatch):
    """Object stores cannot append: metrics.jsonl is rewritten whole, and a resumed writer
    continues the file (emulated gs:// bucket, see tests/_fake_gcs.py)."""
    from _fake_gcs import install, uninstall
    spy = install(monkeypatch, str(tmp_path))
    try:
        with monitor.MetricWriter("gs://bkt/run", upload_every_s=0.0) as w:
            w.write(1, {"loss": 2.0})
            assert json.loads((tmp_path / "bkt/run/metrics.jsonl").read_text())["loss"] == 2.0
        with monitor.MetricWriter("gs://bkt/run") as w:
            w.write(2, {"loss": 1.0})
        rows = [json.loads(l) for l in (tmp_path / "bkt/run/metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert list((tmp_path / "bkt/run/tb").glob("events.out.tfevents.*"))
        assert not any("a" in mode for _, mode in spy["opened"])
    finally:
        monkeypatch.undo()
        uninstall()
