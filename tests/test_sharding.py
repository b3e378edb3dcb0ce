"""Tests for ftjax.sharding on 8 fake CPU devices (tests/conftest.py sets the XLA flag)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ftjax import sharding as S

needs8 = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8 "
           "(tests/conftest.py sets it before jax is imported)")


def sds(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, np.float32)


# ------------------------------------------------------------------------------------------
# Mesh


@needs8
def test_make_mesh_fills_minus_one_and_keeps_all_axes():
    mesh = S.make_mesh({"fsdp": -1, "tensor": 2})
    assert mesh.axis_names == S.MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "expert": 1, "sequence": 1, "tensor": 2}
    assert mesh.devices.size == 8
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@needs8
def test_make_mesh_accepts_configdict_and_exact_sizes():
    import ml_collections
    mesh = S.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 2}
    # Devices in process-major / id order, so batch rows map to processes contiguously.
    assert [d.id for d in mesh.devices.flat] == sorted(d.id for d in jax.devices())


@pytest.mark.parametrize("cfg, needles", [
    ({"data": 3}, ["needs 3 devices", "jax.device_count()=8", "-1"]),
    ({"data": 2, "tensor": 2}, ["needs 4 devices", "product is 8"]),
    ({"fsdp": -1, "tensor": 3}, ["fsdp=-1", "multiply to 3", "divide"]),
    ({"fsdp": -1, "data": -1}, ["several -1"]),
    ({"model": 8}, ["unknown axes ['model']"]),
    ({"data": 0}, ["mesh.data=0"]),
])
@needs8
def test_make_mesh_bad_sizes(cfg, needles):
    with pytest.raises(ValueError) as e:
        S.make_mesh(cfg)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------------
# Rules -> specs (golden table)

DP = ("data", "fsdp")
REPRESENTATIVE = {
    "q_kernel": ("layers", "embed", "heads"),
    "kv_kernel": ("layers", "embed", "kv_heads"),
    "o_kernel": ("layers", "heads", "embed"),
    "up_kernel": ("layers", "embed", "mlp"),
    "down_kernel": ("layers", "mlp", "embed"),
    "embedding": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "norm": ("layers", "embed"),
    "qk_norm": ("layers", None),
    "experts": ("layers", "expert", "embed", "mlp"),
    "tokens": ("batch", "seq"),
}
GOLDEN = {
    "dp": {k: P(*([DP] if v[0] == "batch" else [None]) + [None] * (len(v) - 1))
           for k, v in REPRESENTATIVE.items()},
    "fsdp": {
        "q_kernel": P(None, "fsdp", None), "kv_kernel": P(None, "fsdp", None),
        "o_kernel": P(None, None, "fsdp"), "up_kernel": P(None, "fsdp", None),
        "down_kernel": P(None, None, "fsdp"), "embedding": P(None, "fsdp"),
        "lm_head": P("fsdp", None), "norm": P(None, "fsdp"), "qk_norm": P(None, None),
        "experts": P(None, None, "fsdp", None), "tokens": P(DP, None),
    },
    "fsdp_tp": {
        "q_kernel": P(None, "fsdp", "tensor"), "kv_kernel": P(None, "fsdp", "tensor"),
        "o_kernel": P(None, "tensor", "fsdp"), "up_kernel": P(None, "fsdp", "tensor"),
        "down_kernel": P(None, "tensor", "fsdp"), "embedding": P("tensor", "fsdp"),
        "lm_head": P("fsdp", "tensor"), "norm": P(None, "fsdp"), "qk_norm": P(None, None),
        "experts": P(None, None, "fsdp", "tensor"), "tokens": P(DP, None),
    },
    "tp": {
        "q_kernel": P(None, None, "tensor"), "kv_kernel": P(None, None, "tensor"),
        "o_kernel": P(None, "tensor", None), "up_kernel": P(None, None, "tensor"),
        "down_kernel": P(None, "tensor", None), "embedding": P("tensor", None),
        "lm_head": P(None, "tensor"), "norm": P(None, None), "qk_norm": P(None, None),
        "experts": P(None, None, None, "tensor"), "tokens": P(DP, None),
    },
    "ep": {
        "q_kernel": P(None, "fsdp", "tensor"), "kv_kernel": P(None, "fsdp", "tensor"),
        "o_kernel": P(None, "tensor", "fsdp"), "up_kernel": P(None, "fsdp", "tensor"),
        "down_kernel": P(None, "tensor", "fsdp"), "embedding": P("tensor", "fsdp"),
        "lm_head": P("fsdp", "tensor"), "norm": P(None, "fsdp"), "qk_norm": P(None, None),
        "experts": P(None, "expert", "fsdp", "tensor"),
        "tokens": P(("data", "fsdp", "expert"), None),
    },
}


def test_golden_covers_every_preset():
    assert set(GOLDEN) == set(S.RULES)
    for name, rules in S.RULES.items():
        assert {n for n, _ in rules} >= set(S.LOGICAL_AXES), name


@pytest.mark.parametrize("preset", sorted(GOLDEN))
def test_preset_specs_golden(preset):
    got = {k: S.logical_to_spec(v, preset) for k, v in REPRESENTATIVE.items()}
    assert got == GOLDEN[preset]


def test_mesh_axis_is_used_at_most_once_per_spec():
    # Under fsdp, only the first "embed" dim is sharded; the second stays replicated.
    assert S.logical_to_spec(("embed", "embed"), "fsdp") == P("fsdp", None)
    # A tuple rule is skipped as a whole if any of its axes is taken.
    rules = [("a", "fsdp"), ("batch", ("data", "fsdp"))]
    assert S.logical_to_spec(("a", "batch"), rules) == P("fsdp", None)
    # Later rules for the same name are fallbacks when the first one's axes are taken.
    rules = [("mlp", "tensor"), ("mlp", "fsdp"), ("heads", "tensor")]
    assert S.logical_to_spec(("heads", "mlp"), rules) == P("tensor", "fsdp")
    assert S.logical_to_spec(("mlp", "mlp", "mlp"), rules) == P("tensor", "fsdp", None)


def test_rules_explicit_list_mapping_and_overrides():
    pairs = [["embed", "fsdp"], ["heads", ["tensor"]], ["batch", ("data", "fsdp")]]
    rules = S.get_rules(pairs)
    assert rules == (("embed", "fsdp"), ("heads", "tensor"), ("batch", ("data", "fsdp")))
    assert S.get_rules(rules) == rules  # idempotent
    assert S.get_rules({"embed": "fsdp", "heads": None}) == (("embed", "fsdp"), ("heads", None))
    # Overrides come first and therefore win.
    rules = S.get_rules("fsdp_tp", overrides="heads=none,batch=data+fsdp+expert")
    assert S.logical_to_spec(("layers", "embed", "heads"), rules) == P(None, "fsdp", None)
    assert S.logical_to_spec(("batch",), rules) == P(("data", "fsdp", "expert"))
    assert S.logical_to_spec(("layers", "embed", "mlp"), rules) == P(None, "fsdp", "tensor")


def test_rules_errors():
    with pytest.raises(ValueError, match="unknown sharding rule preset 'zero3'"):
        S.get_rules("zero3")
    with pytest.raises(ValueError, match="unknown mesh axes"):
        S.get_rules([("embed", "model")])
    with pytest.raises(ValueError, match="expected a pair"):
        S.get_rules([("embed",)])
    with pytest.raises(KeyError, match="'mpl' .* has no sharding rule.*mpl=none"):
        S.logical_to_spec(("embed", "mpl"), "fsdp")


# ------------------------------------------------------------------------------------------
# Param shardings and divisibility

AXES = {
    "embed": {"embedding": ("vocab", "embed")},
    "layers": {
        "attn": {"q_proj": {"kernel": ("layers", "embed", "heads")},
                 "k_proj": {"kernel": ("layers", "embed", "kv_heads")},
                 "q_norm": {"scale": ("layers", None)}},
        "mlp": {"up_proj": {"kernel": ("layers", "embed", "mlp")}},
    },
}


def shapes(vocab=256, d=64, heads=128, kv=32, mlp=256, hd=16):
    return {
        "embed": {"embedding": sds(vocab, d)},
        "layers": {
            "attn": {"q_proj": {"kernel": sds(2, d, heads)},
                     "k_proj": {"kernel": sds(2, d, kv)},
                     "q_norm": {"scale": sds(2, hd)}},
            "mlp": {"up_proj": {"kernel": sds(2, d, mlp)}},
        },
    }


@needs8
def test_param_shardings_tree():
    mesh = S.make_mesh({"fsdp": 4, "tensor": 2})
    sh = S.param_shardings(AXES, mesh, "fsdp_tp")
    assert jax.tree.structure(sh) == jax.tree.structure(shapes())
    q = sh["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(q, NamedSharding) and q.mesh is mesh
    assert q.spec == P(None, "fsdp", "tensor")
    assert sh["layers"]["attn"]["q_norm"]["scale"].spec == P(None, None)
    S.check_divisible(shapes(), AXES, mesh, "fsdp_tp")  # all fine
    # Real arrays placed with these shardings have the expected per-device shards.
    x = jax.device_put(np.zeros((2, 64, 128), np.float32), q)
    assert {s.data.shape for s in x.addressable_shards} == {(2, 16, 64)}


@needs8
def test_divisibility_error_lists_every_offender():
    mesh = S.make_mesh({"fsdp": 2, "tensor": 4})
    bad = shapes(vocab=250, heads=10, kv=6, d=64)  # vocab%4, heads%4 and kv%4 all fail
    with pytest.raises(ValueError) as e:
        S.check_divisible(bad, AXES, mesh, "fsdp_tp")
    msg = str(e.value)
    assert msg.startswith("3 param(s) cannot be sharded on mesh (data=1, fsdp=2, expert=1, "
                          "sequence=1, tensor=4)")
    assert ("layers/attn/q_proj/kernel: shape (2, 64, 10), dim 2 (logical 'heads') = 10 is not "
            "divisible by mesh axes ('tensor',) of size 4. Fix: choose a mesh where tensor (=4) "
            "divides 10, or map 'heads' to None in the rules (rule_overrides='heads=none').") in msg
    assert "layers/attn/k_proj/kernel: shape (2, 64, 6), dim 2 (logical 'kv_heads') = 6" in msg
    assert "embed/embedding: shape (250, 64), dim 0 (logical 'vocab') = 250" in msg
    assert "mlp/up_proj" not in msg
    # The suggested override indeed fixes it.
    rules = S.get_rules("fsdp_tp", overrides="heads=none,kv_heads=none,vocab=none")
    S.check_divisible(bad, AXES, mesh, rules)


@needs8
def test_divisibility_multi_axis_and_rank_and_structure_errors():
    mesh = S.make_mesh({"data": 2, "fsdp": 4})
    rules = [("embed", ("data", "fsdp")), ("layers", None), ("heads", None), ("kv_heads", None),
             ("mlp", None), ("vocab", None)]
    with pytest.raises(ValueError, match=r"mesh axes \('data', 'fsdp'\) of size 8.*data\*fsdp"):
        S.check_divisible(shapes(d=12), AXES, mesh, rules)
    # One param with two offending dims is one param with two listed problems.
    rules2 = S.get_rules("fsdp_tp", overrides=[("heads", ("data", "tensor"))])
    two = S.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError) as e:
        S.check_divisible({"w": sds(2, 5, 7)}, {"w": ("layers", "embed", "heads")}, two, rules2)
    assert str(e.value).startswith("1 param(s)") and str(e.value).count("\n  - w:") == 2
    bad_rank = shapes()
    bad_rank["layers"]["attn"]["q_norm"]["scale"] = sds(16)
    with pytest.raises(ValueError, match="q_norm/scale: shape \\(16,\\) has 1 dims"):
        S.check_divisible(bad_rank, AXES, mesh, "fsdp")
    missing = shapes()
    del missing["layers"]["mlp"]
    with pytest.raises(ValueError, match="axes without params: \\['layers/mlp/up_proj/kernel'\\]"):
        S.check_divisible(missing, AXES, mesh, "fsdp")


@needs8
def test_check_on_real_model_axes():
    import ftjax.models as models
    cfg = models.ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                             num_layers=2, num_heads=4, num_kv_heads=2, qk_norm=True)
    axes = models.param_axes(cfg)
    params = jax.eval_shape(lambda: models.init(cfg, jax.random.key(0)))
    mesh = S.make_mesh({"fsdp": 4, "tensor": 2})
    for preset in S.RULES:
        S.check_divisible(params, axes, mesh, preset)
        sh = S.param_shardings(axes, mesh, preset)
        assert jax.tree.structure(sh) == jax.tree.structure(params)


@needs8
def test_state_shardings_follow_params():
    import optax
    mesh = S.make_mesh({"fsdp": 4, "tensor": 2})
    params = shapes()
    psh = S.param_shardings(AXES, mesh, "fsdp_tp")
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = {"step": sds(), "params": params, "opt_state": jax.eval_shape(tx.init, params)}
    sh = S.state_shardings(state, params, psh, mesh)
    q_spec = P(None, "fsdp", "tensor")
    assert sh["params"]["layers"]["attn"]["q_proj"]["kernel"].spec == q_spec
    adam = sh["opt_state"][1][0]
    assert adam.mu["layers"]["attn"]["q_proj"]["kernel"].spec == q_spec
    assert adam.nu["embed"]["embedding"].spec == P("tensor", "fsdp")
    assert adam.count.spec == P() and sh["step"].spec == P()


# ------------------------------------------------------------------------------------------
# Batches


@needs8
def test_batch_sharding_places_expected_rows():
    mesh = S.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sh = S.batch_sharding(mesh, "fsdp_tp", ndim=2)
    assert sh.spec == P(("data", "fsdp"), None)
    x = np.arange(16 * 3).reshape(16, 3)
    arr = S.shard_host_batch({"x": x}, sh)["x"]
    # Device at mesh coords (i, j, ., ., t) holds rows of shard k = 2*i + j (4 rows each),
    # replicated over the tensor axis.
    for (i, j, _, _, t), dev in np.ndenumerate(mesh.devices):
        k = 2 * i + j
        shard = next(s for s in arr.addressable_shards if s.device == dev)
        np.testing.assert_array_equal(np.asarray(shard.data), x[4 * k:4 * k + 4])


@needs8
def test_shard_host_batch_round_trip_mixed_ranks():
    mesh = S.make_mesh({"fsdp": -1})
    sh = S.batch_sharding(mesh, "fsdp")
    batch = {"tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
             "weights": np.linspace(0, 1, 8, dtype=np.float32),
             "pair": np.ones((8, 2, 3), np.int32)}
    out = S.shard_host_batch(batch, sh)
    for k, v in batch.items():
        assert isinstance(out[k], jax.Array)
        assert out[k].sharding.spec[0] == ("data", "fsdp")
        np.testing.assert_array_equal(np.asarray(out[k]), v)
    assert S.local_batch_rows(sh, 8) == (0, 8)  # one process holds every row
    per_leaf = S.batch_shardings(batch, mesh, "fsdp")
    assert per_leaf["pair"].spec == P(("data", "fsdp"), None, None)


@needs8
def test_check_batch_divisible():
    mesh = S.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    S.check_batch_divisible(8, mesh, "fsdp_tp")
    S.check_batch_divisible(16, mesh, "fsdp_tp", accum_steps=4)
    with pytest.raises(ValueError, match=r"microbatch 2 \(= 8 / accum_steps 4\) is not divisible "
                                         r"by the batch mesh axes \('data', 'fsdp'\) of size 4"):
        S.check_batch_divisible(8, mesh, "fsdp_tp", accum_steps=4)
    with pytest.raises(ValueError, match="not divisible by accum_steps=4.*multiple of 16"):
        S.check_batch_divisible(10, mesh, "fsdp_tp", accum_steps=4)


@needs8
def test_unused_mesh_axis_is_an_error():
    mesh = S.make_mesh({"fsdp": 4, "tensor": 2})
    S.check_mesh_axes_used(mesh, "fsdp_tp")
    with pytest.raises(ValueError, match=r"\['tensor=2'\] are used by no sharding rule"):
        S.check_mesh_axes_used(mesh, "fsdp")
    with pytest.raises(ValueError) as e:
        S.validate(mesh, "fsdp", shapes_tree=shapes(d=6), axes_tree=AXES, global_batch=6)
    msg = str(e.value)  # all three problems in one error
    assert "tensor=2" in msg and "layers/attn/q_proj/kernel" in msg and "global batch" in msg


@needs8
def test_jit_with_param_and_batch_shardings():
    """The shardings plug into jit in/out shardings and compute the same as unsharded."""
    mesh = S.make_mesh({"fsdp": 4, "tensor": 2})
    w_sh = S.logical_sharding(("embed", "mlp"), mesh, "fsdp_tp")
    x_sh = S.batch_sharding(mesh, "fsdp_tp", ndim=2)
    w = np.random.default_rng(0).normal(size=(16, 32)).astype(np.float32)
    x = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
    f = jax.jit(lambda w, x: x @ w, in_shardings=(w_sh, x_sh),
                out_shardings=S.logical_sharding(("batch", "mlp"), mesh, "fsdp_tp"))
    y = f(jax.device_put(w, w_sh), S.shard_host_batch(x, x_sh))
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Distributed initialisation

CLUSTER_VARS = ["JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                "SLURM_STEP_NUM_TASKS", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE",
                "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES"]


@pytest.fixture
def clean_env(monkeypatch):
    for var in CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)


def test_initialize_distributed_single_process_is_noop(clean_env):
    import ml_collections
    assert S.initialize_distributed(None) == (0, 1)
    cfg = ml_collections.ConfigDict(dict(coordinator_address=None, num_processes=None,
                                         process_id=None, local_device_ids=None,
                                         cpu_collectives=None))
    assert S.initialize_distributed(cfg) == (0, 1)
    assert S.initialize_distributed({"num_processes": 1}) == (0, 1)  # idempotent too
    assert not jax.distributed.is_initialized()


def test_initialize_distributed_config_errors(clean_env):
    with pytest.raises(ValueError, match="coordinator_address is unset"):
        S.initialize_distributed({"num_processes": 2, "process_id": 0})
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        S.initialize_distributed({"coordinator_address": "127.0.0.1:1", "num_processes": 2,
                                  "process_id": 2})
    with pytest.raises(ValueError, match="unknown fields \\['num_hosts'\\]"):
        S.initialize_distributed({"num_hosts": 2})
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8"}, None),  # sbatch script itself, not an srun step
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "8"}, "slurm"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "tpu-pod"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu-multislice"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
])
def test_detect_cluster_env(env, expected):
    assert S.detect_cluster_env(env) == expected


def test_detect_cloud_tpu_vm():
    # GCE TPU VMs keep the worker list in the metadata server, so the VM itself is the signal.
    assert S.detect_cluster_env({}, tpu_vm=True) == "cloud-tpu-vm"
    assert S.detect_cluster_env({"TPU_SKIP_MDS_QUERY": "1"}, tpu_vm=True) is None
    assert S.detect_cluster_env({}, tpu_vm=False) is None
