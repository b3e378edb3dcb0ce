"""Two real JAX processes on CPU over loopback + gloo: init, global batch, jitted reduction."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_mp_psum_worker.py"
TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Each process owns 4 CPU devices -> 8 global devices. Drop cluster variables so that
    # nothing but the explicit config decides the topology.
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_NUM_CPU_DEVICES"):
        env.pop(var, None)
    return env


def test_two_process_global_sum():
    nproc, port = 2, _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(port), str(i), str(nproc)],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i in range(nproc)]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            outputs.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[1][-2000:] for p in procs]
        pytest.fail(f"workers did not finish in {TIMEOUT_S}s; stderr tails: {logs}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (rc, out, err) in enumerate(outputs):
        assert rc == 0, f"process {i} exited with {rc}:\n{err[-4000:]}"
    results = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in outputs]

    full = np.arange(16 * 3, dtype=np.float64).reshape(16, 3)
    want_sum = float(full.sum())
    want_weighted = float((full * np.arange(16)[:, None]).sum())
    for i, r in enumerate(results):
        assert r["process_index"] == i and r["process_count"] == 2
        assert r["device_count"] == 8 and r["local_device_count"] == 4
        assert r["mesh"]["data"] == 8
        assert r["rows"] == [8 * i, 8 * i + 8]  # process p supplies rows [p*B/P, (p+1)*B/P)
        assert r["global_shape"] == [16, 3]
        assert r["local_shard_starts"] == [8 * i + 2 * k for k in range(4)]
        assert r["sum"] == want_sum
        assert r["weighted"] == want_weighted
