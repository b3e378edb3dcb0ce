"""2 processes x 4 CPU devices (gloo over loopback) train exactly like 1 process x 8 devices.

Both runs go through the real entry point (`python -m ftjax.main`): distributed start-up from
the config, each process loading only its rows of every global batch, the sharded step and
multi-process checkpointing. The two processes share one workdir, as on a pod with a gs://
workdir: orbax writes each checkpoint collectively, only process 0 writes the run files, and
the 2-process run stops at step 3 and resumes from that shared checkpoint.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
ARGS = ["--config.train.batch_size=16", "--config.optimizer.schedule=constant",
        "--config.train.log_every=1", "--config.train.checkpoint_every=3",
        "--config.train.progress=False", "--config.data.eval_examples=0",
        "--config.data.n_per_task=200", "--config.optimizer.warmup_steps=2", "--config.model.hidden_size=64",
        "--config.model.intermediate_size=128", "--config.model.num_layers=2",
        "--config.mesh.data=2", "--config.mesh.fsdp=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        env.pop(var, None)
    return env


def _run(cmds, env):
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in cmds]
    try:
        outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def _losses(workdir: pathlib.Path) -> list[float]:
    rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["step"]) if r["split"] == "train"]


def _hashes(outs: list[str]) -> list[str]:
    return [re.search(r"hash=(\w+)", out).group(1) for out in outs]


def test_two_processes_match_one_process(tmp_path):
    def cmd(steps, workdir):
        return [sys.executable, "-m", "ftjax.main", "--config",
                f"configs/sft_synthetic.py:steps={steps}", "--workdir", str(workdir)] + ARGS

    # The final runs also evaluate on the mesh (no params gathered to a host): held-out exact
    # match and two evaluation tasks, which must agree between 1 and 2 processes.
    evals = ["--config.data.eval_examples=16", "--config.train.eval_every=6",
             "--config.eval.tasks=('experiments/data_samples/eval/dmy2iso_mc.jsonl:limit=16',"
             "'experiments/data_samples/eval/dmy2iso_gen.jsonl:limit=8,max_new_tokens=6')"]
    one_out = _run([cmd(6, tmp_path / "one") + evals], _env(8))[0]
    port = _free_port()
    dist = ["--config.distributed.coordinator_address=127.0.0.1:%d" % port,
            "--config.distributed.num_processes=2"]
    shared = tmp_path / "two"  # one workdir for both processes
    outs = _run([cmd(3, shared) + dist + [f"--config.distributed.process_id={i}"]
                 for i in range(2)], _env(4))
    first_hashes = _hashes(outs)
    assert first_hashes[0] == first_hashes[1], outs[1][-2000:]  # the hash is the experiment's
    assert sorted(p.name for p in shared.glob("config*")) == ["config.json", "config_hash.txt"]
    assert (shared / "checkpoints" / "3").exists()

    # Resume both processes from the shared step-3 checkpoint and train to step 6.
    dist[0] = "--config.distributed.coordinator_address=127.0.0.1:%d" % _free_port()
    outs = _run([cmd(6, shared) + dist + [f"--config.distributed.process_id={i}"] + evals
                 for i in range(2)], _env(4))
    assert all("resumed from checkpoint step 3" in out for out in outs), outs[0][-2000:]
    em = [re.search(r"held-out exact match: ([\d.]+) over 16", o).group(1)
          for o in (one_out, *outs)]
    assert em[0] == em[1] == em[2], em
    task_rows = [[r for r in map(json.loads, open(d / "metrics.jsonl"))
                  if "dmy2iso_mc/acc" in r] for d in (tmp_path / "one", shared)]
    assert len(task_rows[0]) == len(task_rows[1]) == 1
    for key in ("dmy2iso_mc/acc", "dmy2iso_mc/acc_norm", "dmy2iso_gen/exact_match",
                "dmy2iso_gen/token_f1", "dmy2iso_mc/confidence"):
        assert task_rows[1][0][key] == pytest.approx(task_rows[0][0][key], rel=1e-4, abs=1e-5)
    hashes = _hashes(outs)
    assert hashes[0] == hashes[1] != first_hashes[0]
    # Only process 0 kept the step-3 config (the run was resumed with more steps).
    assert sorted(p.name for p in shared.glob("config*")) == [
        f"config.{first_hashes[0]}.json", "config.json", "config_hash.txt"]
    one, two = _losses(tmp_path / "one"), _losses(shared)
    assert len(one) == len(two) == 6
    # Same global batches, same math; only the reduction order across processes may differ.
    assert two == pytest.approx(one, rel=1e-5)
    assert (shared / "checkpoints" / "6").exists()
