"""Multi-host initialisation: cluster detection and `jax.distributed.initialize`."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

from ftjax.sharding.mesh import cfg_items

# --------------------------------------------------------------------------------------------
# Multi-host initialisation
# --------------------------------------------------------------------------------------------

def _on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM (JAX decides this from the PCI bus when it is imported)."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:  # private module moved: fall back to the environment checks
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect_cluster_env(env: Mapping[str, str] | None = None,
                       tpu_vm: bool | None = None) -> str | None:
    """Name the multi-process launcher JAX can auto-configure, or None.

    Reads ``env`` (default ``os.environ``). A single SLURM task or a TPU VM host list with one
    entry is None. On a GCE TPU VM the host list lives in the metadata server, not in the
    environment, so any Cloud TPU VM counts (``tpu_vm``, default: detect; JAX's own
    initialisation then finds the workers and is a 1-process no-op on a single host).
    """
    if tpu_vm is None:
        tpu_vm = env is None and _on_cloud_tpu_vm()
    env = os.environ if env is None else env

    def as_int(key: str) -> int:
        try:
            return int(env.get(key, "0").split("(")[0])
        except ValueError:
            return 0

    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    # SLURM_STEP_NODELIST exists only inside an `srun` step, which is what JAX's detector needs;
    # the sbatch script itself (one process) must not try to join a cluster.
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and \
            max(as_int("SLURM_STEP_NUM_TASKS"), as_int("SLURM_NTASKS")) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and as_int("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or as_int("MEGASCALE_NUM_SLICES") > 1:
        return "tpu-multislice"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "tpu-pod"
    if tpu_vm and env.get("TPU_SKIP_MDS_QUERY") is None:
        return "cloud-tpu-vm"
    return None


def initialize_distributed(dist_cfg: Any = None) -> tuple[int, int]:
    """Join a multi-process JAX run if one is configured or detected; return (index, count).

    Must run before any other JAX call that touches devices. ``dist_cfg`` fields (all
    optional): ``coordinator_address`` ("host:port" of process 0), ``num_processes``,
    ``process_id``, ``local_device_ids``, ``cpu_collectives`` ("gloo"/"mpi"; needed for
    cross-process collectives on CPU), ``initialization_timeout`` (s). With nothing set,
    JAX auto-detects TPU pods, SLURM ``srun`` steps and Open MPI; otherwise it is a no-op.
    Idempotent.
    """
    cfg = cfg_items(dist_cfg)
    known = {"coordinator_address", "num_processes", "process_id", "local_device_ids",
             "cpu_collectives", "initialization_timeout"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"distributed config has unknown fields {unknown}; known: "
                         f"{sorted(known)}.")
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()

    coordinator = cfg.get("coordinator_address") or None
    num = cfg.get("num_processes")
    pid = cfg.get("process_id")
    local_ids = cfg.get("local_device_ids")
    if local_ids is not None and not isinstance(local_ids, int):
        local_ids = [int(i) for i in local_ids]
    timeout = int(cfg.get("initialization_timeout") or 300)
    collectives = cfg.get("cpu_collectives")

    explicit = coordinator is not None or (num is not None and int(num) > 1)
    detected = None if explicit else detect_cluster_env()
    if not explicit and detected is None:
        return jax.process_index(), jax.process_count()  # single process: nothing to join

    if explicit:
        if num is not None and pid is not None and not 0 <= int(pid) < int(num):
            raise ValueError(f"distributed.process_id={pid} must be in [0, num_processes={num}).")
        if coordinator is None and detect_cluster_env() is None:
            raise ValueError(
                f"distributed.num_processes={num} but distributed.coordinator_address is unset "
                "and no cluster launcher (SLURM srun, TPU pod, Open MPI) was detected. Fix: "
                "--config.distributed.coordinator_address=HOST:PORT (process 0's address, the "
                "same on every process) and a distinct --config.distributed.process_id per process.")
    if collectives:
        # Only read by the CPU backend, so setting it is harmless on GPU/TPU; it must happen
        # before the backend starts, and we cannot ask for the platform without starting it.
        if collectives not in ("gloo", "mpi", "megascale"):
            raise ValueError(f"distributed.cpu_collectives={collectives!r}: use 'gloo' "
                             "(works everywhere) or 'mpi'.")
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    try:
        if explicit:
            jax.distributed.initialize(
                coordinator_address=coordinator,
                num_processes=None if num is None else int(num),
                process_id=None if pid is None else int(pid),
                local_device_ids=local_ids,
                initialization_timeout=timeout)
        else:
            jax.distributed.initialize(local_device_ids=local_ids,
                                       initialization_timeout=timeout)
    except RuntimeError as e:
        raise RuntimeError(
            f"jax.distributed.initialize failed ({'explicit config' if explicit else detected}): "
            f"{e}. initialize_distributed() must run before any JAX computation or device "
            "query; call it first thing in main().") from e
    return jax.process_index(), jax.process_count()
