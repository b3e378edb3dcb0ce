"""One process of the 2-process CPU smoke test (launched by tests/test_multiprocess.py).

Usage: python tests/_mp_psum_worker.py PORT PROCESS_ID NUM_PROCESSES
Expects XLA_FLAGS=--xla_force_host_platform_device_count=4 and JAX_PLATFORMS=cpu.
Joins the run over gloo, builds a global [16, 3] batch from each process's rows, reduces it
with a jitted computation over all 8 devices and prints one JSON line with the results.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from ftjax import sharding as S

GLOBAL_ROWS, COLS = 16, 3


def main() -> None:
    port, pid, nproc = (int(a) for a in sys.argv[1:4])
    index, count = S.initialize_distributed({
        "coordinator_address": f"127.0.0.1:{port}", "num_processes": nproc,
        "process_id": pid, "cpu_collectives": "gloo", "initialization_timeout": 60})
    # A second call is a no-op.
    assert S.initialize_distributed({"coordinator_address": f"127.0.0.1:{port}",
                                     "num_processes": nproc, "process_id": pid}) == (index, count)

    import jax
    import jax.numpy as jnp

    mesh = S.make_mesh({"data": -1})
    sharding = S.batch_sharding(mesh, "dp", ndim=2)
    start, stop = S.local_batch_rows(sharding, GLOBAL_ROWS)
    full = np.arange(GLOBAL_ROWS * COLS, dtype=np.float32).reshape(GLOBAL_ROWS, COLS)
    batch = S.shard_host_batch({"x": full[start:stop]}, sharding)
    x = batch["x"]

    @jax.jit
    def reduce(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        # The row-weighted sum catches rows placed in the wrong order, not only lost rows.
        rows = jnp.arange(x.shape[0], dtype=x.dtype)[:, None]
        return x.sum(), (x * rows).sum()

    total, weighted = jax.device_get(reduce(x))
    local_rows = sorted({int(s.index[0].start or 0) for s in x.addressable_shards})
    print(json.dumps({
        "process_index": index, "process_count": count,
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "mesh": dict(mesh.shape), "rows": [start, stop], "global_shape": list(x.shape),
        "local_shard_starts": local_rows, "sum": float(total), "weighted": float(weighted),
    }), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
