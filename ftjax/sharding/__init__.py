"""Meshes, logical-axis sharding rules, divisibility checks and multi-host set-up.

Every param leaf carries a tuple of *logical* axis names (``("layers", "embed", "heads")``);
a *rule set* maps each logical name to zero or more *mesh* axes. Changing the parallelism
strategy is changing the rule set (a preset name or a short list of pairs), never the model.

Mesh axes, always present in this order (absent ones have size 1 so rules can still name them):

    data      pure data parallelism (params replicated)
    fsdp      data parallelism with params/optimizer state sharded (ZeRO-3 style)
    expert    expert parallelism for MoE expert weights
    sequence  sequence/context parallelism (no preset uses it yet)
    tensor    Megatron-style tensor parallelism

Rule semantics (as in Flax's ``logical_to_mesh_axes``): for every dim, the rules naming its
logical axis are tried in order and the first one whose mesh axes are all still unused in
this spec wins; if none is usable the dim is replicated. A mesh axis therefore shards at most
one dim of any array. A logical name with no rule at all is an error (typos must not silently
replicate a 70B embedding); map it to ``None`` to replicate on purpose.

Everything that can fail because of shapes (divisibility, batch size, unused mesh axes) is
checked here *before* anything is compiled, with errors that list every offender and the fix.

Modules, one job each: `rules` (axis names, presets, logical -> PartitionSpec), `mesh` (the
device mesh from config), `shardings` (param/state/batch shardings, host batches onto devices),
`checks` (divisibility and batch checks before compiling), `distributed` (multi-host set-up).
"""

from ftjax.sharding.checks import (batch_axes, check_batch_divisible, check_divisible,
                                   check_mesh_axes_used, validate)
from ftjax.sharding.distributed import detect_cluster_env, initialize_distributed
from ftjax.sharding.mesh import make_mesh, mesh_shape_from_config
from ftjax.sharding.rules import (LOGICAL_AXES, MESH_AXES, RULES, MeshAxes, Rules, RulesLike,
                                  get_rules, is_axes_leaf, keypath_str, logical_to_spec,
                                  parse_rule_overrides)
from ftjax.sharding.shardings import (batch_sharding, batch_shardings, local_batch_rows,
                                      logical_sharding, param_shardings, param_specs,
                                      shard_host_batch, state_shardings, with_logical_constraint)

__all__ = [
    "MESH_AXES",
    "LOGICAL_AXES",
    "RULES",
    "Rules",
    "is_axes_leaf",
    "keypath_str",
    "make_mesh",
    "mesh_shape_from_config",
    "get_rules",
    "parse_rule_overrides",
    "logical_to_spec",
    "logical_sharding",
    "param_specs",
    "param_shardings",
    "state_shardings",
    "check_divisible",
    "check_mesh_axes_used",
    "check_batch_divisible",
    "validate",
    "batch_axes",
    "batch_sharding",
    "batch_shardings",
    "local_batch_rows",
    "shard_host_batch",
    "with_logical_constraint",
    "initialize_distributed",
    "detect_cluster_env",
]
