"""Sparse upcycling (Komatsuzaki et al. 2022): a dense checkpoint becomes a sparse MoE model.

Every layer's MLP is copied into E experts (optionally with small multiplicative noise to break
their symmetry) and a new router is added; every other param is carried over unchanged. With
identical experts and routing weights that sum to one per token (router "topk_softmax", or
"softmax_topk" with `router_renormalize`), the upcycled model computes exactly the dense model's
function: sum_j w_j * MLP(x) = MLP(x). In capacity dispatch this holds only while no assignment
is dropped (enough capacity). Training then lets the experts diverge.

Config section (`model.upcycle`, applied after loading `model.init_from` and before PEFT; see
`section` and docs/moe.md, "Sparse upcycling"): num_experts (0 = off), top_k, noise_std,
router_init_std, router, router_renormalize, router_jitter, dispatch, capacity_factor,
aux_loss_coef, z_loss_coef, num_shared_experts.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.models.config import ModelConfig
from ftjax.models.transformer import param_shapes

Params = dict[str, Any]

# ModelConfig fields `upcycle(..., **moe_fields)` may set besides num_experts/_per_tok.
MOE_FIELDS = ("expert_intermediate_size", "num_shared_experts", "router", "router_renormalize",
              "router_jitter", "moe_dispatch", "capacity_factor", "router_aux_loss_coef",
              "router_z_loss_coef", "moe_grouped_impl", "moe_block_size")

# `model.upcycle` section field -> ModelConfig field (the rest are upcycling's own knobs).
SECTION_TO_CONFIG = {"num_experts": "num_experts", "top_k": "num_experts_per_tok",
                     "router": "router", "router_renormalize": "router_renormalize",
                     "router_jitter": "router_jitter", "dispatch": "moe_dispatch",
                     "capacity_factor": "capacity_factor", "aux_loss_coef": "router_aux_loss_coef",
                     "z_loss_coef": "router_z_loss_coef",
                     "num_shared_experts": "num_shared_experts"}
SECTION_DEFAULTS: dict[str, Any] = dict(
    num_experts=0,            # experts per layer; 0 = no upcycling
    top_k=2,                  # experts per token
    noise_std=0.0,            # expert copies w * (1 + noise_std * N(0, 1)); 0 = exact copies
    router_init_std=0.02,     # router kernel ~ N(0, std^2); 0 = all-zero router
    router="topk_softmax",    # function-preserving; "softmax_topk" needs router_renormalize
    router_renormalize=False,
    router_jitter=0.0,
    dispatch="dropless",      # "dropless" | "capacity"
    capacity_factor=1.25,
    aux_loss_coef=0.01,       # load balancing: identical experts start with uniform-ish load
    z_loss_coef=0.0,
    num_shared_experts=0,     # always-on experts: dense copies with a zero down projection
)

_KEY_SALT = 2022  # folds the run seed into the upcycling key (router init, expert noise)


def upcycle(params: Params, cfg: ModelConfig, *, num_experts: int, num_experts_per_tok: int = 2,
            key: jax.Array, router_init_std: float = 0.02, noise_std: float = 0.0,
            **moe_fields: Any) -> tuple[Params, ModelConfig]:
    """Turns dense `params` of `cfg` into an MoE model of E = num_experts copies of each MLP.

    Returns (params', cfg'). The router kernel [L, d, E] is N(0, router_init_std^2) (zeros for
    std 0); experts are exact copies, or w * (1 + noise_std * eps) with eps ~ N(0, 1) drawn per
    expert and entry. `moe_fields` sets the other MoE fields of ModelConfig (MOE_FIELDS).
    Shared experts (num_shared_experts = n) start as n copies of the MLP side by side with a zero
    down projection, so they add nothing until trained. Works on numpy (host) leaves, which
    stay on the host, and on jax arrays (also under jit).
    """
    new_cfg = upcycled_config(cfg, num_experts=num_experts,
                              num_experts_per_tok=num_experts_per_tok, **moe_fields)
    if not router_init_std >= 0:
        raise ValueError(f"upcycle: router_init_std={router_init_std} must be >= 0 "
                         "(0 = all-zero router)")
    if not noise_std >= 0:
        raise ValueError(f"upcycle: noise_std={noise_std} must be >= 0 (0 = exact copies)")
    _check_params(params, cfg)

    layers = dict(params["layers"])
    mlp = layers.pop("mlp")
    k_router, k_noise = jax.random.split(key)
    e = num_experts
    moe: Params = {}
    for i, name in enumerate(sorted(mlp)):
        w = mlp[name]["kernel"]                                 # [L, in, out]
        xp = np if isinstance(w, np.ndarray) else jnp
        experts = xp.broadcast_to(w[:, None], (w.shape[0], e) + w.shape[1:])  # [L, E, in, out]
        if noise_std > 0:
            eps = jax.random.normal(jax.random.fold_in(k_noise, i), experts.shape, jnp.float32)
            experts = experts * (1.0 + noise_std * xp.asarray(eps))
        moe[name] = {"kernel": _like(experts, w)}
    n_layers, d = cfg.num_layers, cfg.hidden_size
    ref = mlp["up_proj"]["kernel"]
    router = router_init_std * jax.random.normal(k_router, (n_layers, d, e), jnp.float32)
    moe["router"] = {"kernel": _like(router, ref)}
    if new_cfg.num_shared_experts > 0:
        moe["shared"] = _shared_experts(mlp, new_cfg.num_shared_experts)
    layers["moe"] = moe
    out = dict(params)
    out["layers"] = layers
    _check_structure(out, new_cfg)
    return out, new_cfg


def upcycled_config(cfg: ModelConfig, *, num_experts: int, num_experts_per_tok: int = 2,
                    **moe_fields: Any) -> ModelConfig:
    """The MoE ModelConfig that `upcycle` produces from the dense `cfg` (no params needed)."""
    if cfg.num_experts > 0:
        raise ValueError(f"upcycle: the model is already a mixture of experts (num_experts="
                         f"{cfg.num_experts}); upcycling starts from a dense checkpoint "
                         "(num_experts=0)")
    if cfg.mlp_bias:
        raise ValueError(f"upcycle: family {cfg.family!r} has MLP biases (mlp_bias=True, e.g. "
                         "GPT-2), and ftjax experts have none, so the copies could not reproduce "
                         "the dense MLP. Upcycle a bias-free MLP (Llama, Mistral, Qwen, Gemma)")
    unknown = sorted(set(moe_fields) - set(MOE_FIELDS))
    if unknown:
        raise ValueError(f"upcycle: unknown MoE fields {unknown}; allowed: {list(MOE_FIELDS)} "
                         "(upcycling changes only the MLP, not the rest of the architecture)")
    if int(num_experts) < 1:
        raise ValueError(f"upcycle: num_experts={num_experts} must be >= 1")
    width = moe_fields.get("expert_intermediate_size")
    if width not in (None, cfg.intermediate_size):
        raise ValueError(f"upcycle: expert_intermediate_size={width} differs from the dense "
                         f"intermediate_size={cfg.intermediate_size}; experts are copies of the "
                         "dense MLP, so leave expert_intermediate_size unset")
    return dataclasses.replace(cfg, num_experts=int(num_experts),
                               num_experts_per_tok=int(num_experts_per_tok),
                               expert_intermediate_size=None, family=_family(cfg), **moe_fields)


def preserves_function(cfg: ModelConfig) -> bool:
    """Whether identical experts reproduce the dense MLP: the k routing weights sum to one
    (capacity dispatch additionally needs every assignment to fit)."""
    return cfg.router == "topk_softmax" or cfg.router_renormalize


def section(**overrides: Any) -> Any:
    """A `model.upcycle` config section with every field (so each can be set on the CLI)."""
    import ml_collections
    fields = dict(SECTION_DEFAULTS)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"model.upcycle: unknown fields {unknown}; valid: {sorted(fields)}")
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def enabled(sec: Optional[Any]) -> bool:
    """True when a `model.upcycle` section asks for upcycling (num_experts > 0)."""
    return sec is not None and int(_as_dict(sec).get("num_experts", 0) or 0) > 0


def config_from_section(sec: Optional[Any], cfg: ModelConfig) -> ModelConfig:
    """cfg upcycled as the `model.upcycle` section says (cfg itself when it is off)."""
    if not enabled(sec):
        return cfg
    n, k, extra = _section_args(sec)
    return upcycled_config(cfg, num_experts=n, num_experts_per_tok=k, **extra)


def upcycle_from_section(sec: Any, params: Params, cfg: ModelConfig,
                         key: jax.Array) -> tuple[Params, ModelConfig]:
    """`upcycle` with the arguments of a `model.upcycle` section (unchanged when it is off)."""
    if not enabled(sec):
        return params, cfg
    n, k, extra = _section_args(sec)
    d = _as_dict(sec)
    return upcycle(params, cfg, num_experts=n, num_experts_per_tok=k, key=key,
                   router_init_std=float(d["router_init_std"]), noise_std=float(d["noise_std"]),
                   **extra)


def upcycle_key(seed: int) -> jax.Array:
    """The key a run's upcycling uses (router init, expert noise), derived from its seed."""
    return jax.random.fold_in(jax.random.PRNGKey(int(seed)), _KEY_SALT)


# --------------------------------------------------------------------------------------------

def _as_dict(sec: Any) -> dict[str, Any]:
    return sec.to_dict() if hasattr(sec, "to_dict") else dict(sec)


def _section_args(sec: Any) -> tuple[int, int, dict[str, Any]]:
    d = _as_dict(sec)
    unknown = sorted(set(d) - set(SECTION_DEFAULTS))
    if unknown:
        raise ValueError(f"model.upcycle: unknown fields {unknown}; valid: "
                         f"{sorted(SECTION_DEFAULTS)}")
    d = {**SECTION_DEFAULTS, **d}
    extra = {SECTION_TO_CONFIG[k]: d[k] for k in SECTION_TO_CONFIG
             if k not in ("num_experts", "top_k")}
    extra["capacity_factor"] = float(extra["capacity_factor"])
    for name in ("router_jitter", "router_aux_loss_coef", "router_z_loss_coef"):
        extra[name] = float(extra[name])
    extra["num_shared_experts"] = int(extra["num_shared_experts"])
    extra["router_renormalize"] = bool(extra["router_renormalize"])
    return int(d["num_experts"]), int(d["top_k"]), extra


def _family(cfg: ModelConfig) -> str:
    # Llama/Mistral MLPs upcycle into Mixtral's layout; other families keep their name.
    return "mixtral" if cfg.family in ("llama", "mistral") else cfg.family


def _like(x: Any, ref: Any) -> Any:
    """x in ref's dtype, as numpy when ref is a numpy (host) array."""
    if isinstance(ref, np.ndarray):
        return np.ascontiguousarray(np.asarray(x, ref.dtype))
    return jnp.asarray(x, ref.dtype)


def _shared_experts(mlp: Params, n: int) -> Params:
    """n copies of the MLP side by side (width n*f), with a zero down projection."""
    out = {}
    for name, p in mlp.items():
        w = p["kernel"]                                           # [L, in, out]
        xp = np if isinstance(w, np.ndarray) else jnp
        if name == "down_proj":
            out[name] = {"kernel": _like(xp.zeros((w.shape[0], n * w.shape[1], w.shape[2])), w)}
        else:
            out[name] = {"kernel": _like(xp.concatenate([w] * n, axis=-1), w)}
    return out


def _check_params(params: Params, cfg: ModelConfig) -> None:
    """Fails with a clear message unless params are plain dense arrays matching cfg."""
    from ftjax.peft.core import is_structured
    expected = param_shapes(cfg)
    mlp = params.get("layers", {}).get("mlp") if isinstance(params, Mapping) else None
    if not isinstance(mlp, Mapping):
        raise ValueError("upcycle: params have no 'layers/mlp' subtree; upcycling needs the "
                         "dense params of the model (as models.init or a checkpoint gives them)")
    for name, spec in expected["layers"]["mlp"].items():
        w = mlp.get(name, {}).get("kernel") if isinstance(mlp.get(name), Mapping) else None
        if w is None:
            raise ValueError(f"upcycle: params lack 'layers/mlp/{name}/kernel' that the config "
                             f"(mlp={cfg.mlp!r}) needs")
        if is_structured(w):
            raise ValueError(f"upcycle: 'layers/mlp/{name}/kernel' is a {type(w).__name__}; "
                             "upcycle the plain dense params, then apply PEFT or quantization")
        if tuple(w.shape) != tuple(spec["kernel"].shape):
            raise ValueError(f"upcycle: 'layers/mlp/{name}/kernel' has shape {tuple(w.shape)}, "
                             f"the config expects {tuple(spec['kernel'].shape)}; pass the "
                             "ModelConfig the params were made with")


def _check_structure(params: Params, cfg: ModelConfig) -> None:
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    want = jax.tree.map(lambda x: tuple(x.shape), param_shapes(cfg))
    if got != want:
        raise ValueError("upcycle: the upcycled params do not match the MoE config's layout "
                         f"(got {got}, want {want}); the dense params have extra or missing leaves")
