"""The device mesh from a config section (one -1 size auto-filled; multi-slice aware)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from ftjax.sharding.rules import MESH_AXES, mesh_str_from

# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------

def cfg_items(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        return dict(cfg.to_dict())
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"expected a dict or ConfigDict, got {type(cfg).__name__}: {cfg!r}")


def mesh_shape_from_config(mesh_cfg: Any, device_count: int) -> dict[str, int]:
    """Resolve ``{axis: size}`` (one size may be -1) into sizes over all of ``MESH_AXES``.

    Missing axes get size 1. Raises ``ValueError`` when the product of sizes does not equal
    ``device_count`` or the config is malformed, saying what to change.
    """
    raw = cfg_items(mesh_cfg)
    unknown = sorted(set(raw) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh config has unknown axes {unknown}; valid axes are "
                         f"{list(MESH_AXES)} (e.g. --config.mesh.fsdp=-1).")
    sizes: dict[str, int] = {}
    for name in MESH_AXES:
        v = raw.get(name, 1)
        if v is None:
            v = 1
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (v < 1 and v != -1):
            raise ValueError(f"mesh.{name}={v!r}: sizes must be positive ints, or -1 for "
                             "'all remaining devices'.")
        sizes[name] = int(v)
    auto = [n for n, s in sizes.items() if s == -1]
    shown = mesh_str_from(sizes)
    if len(auto) > 1:
        raise ValueError(f"mesh ({shown}) has several -1 sizes {auto}; at most one axis can be "
                         "auto-filled. Give explicit sizes to all but one.")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if auto:
        if device_count % fixed:
            raise ValueError(
                f"mesh ({shown}): cannot fill mesh.{auto[0]}=-1 because the other axes "
                f"multiply to {fixed}, which does not divide jax.device_count()={device_count}. "
                f"Fix: choose sizes for the other axes whose product divides {device_count}.")
        sizes[auto[0]] = device_count // fixed
    elif fixed != device_count:
        raise ValueError(
            f"mesh ({shown}) needs {fixed} devices but jax.device_count()={device_count} "
            f"(over {jax.process_count()} process(es)). Fix: choose sizes whose product is "
            f"{device_count}, or set one axis to -1 to absorb the remaining devices "
            f"(e.g. --config.mesh.fsdp=-1).")
    return sizes


def _num_slices(devices: Sequence[Any]) -> int:
    """Number of TPU slices (DCN-connected islands) among ``devices``; 1 elsewhere."""
    if not devices or not hasattr(devices[0], "slice_index"):
        return 1
    return len({d.slice_index for d in devices})


def make_mesh(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """Build a ``Mesh`` with axes ``MESH_AXES`` from ``{axis: size}`` (one size may be -1).

    Uses the global device list (``jax.devices()``), so under multi-process every process
    builds the same mesh. Axes are ``AxisType.Auto``: shardings are given to ``jax.jit`` and
    GSPMD propagates them (``jax.make_mesh`` defaults to Explicit axes since JAX 0.7).
    On a multi-slice TPU the slices (DCN) are laid out along ``data`` (or ``fsdp`` if ``data``
    is not a multiple of the slice count), keeping tensor/expert traffic inside a slice.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape_from_config(mesh_cfg, len(devices))
    shape = tuple(sizes[n] for n in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    slices = _num_slices(devices)
    if slices > 1:
        dcn_axis = next((a for a in ("data", "fsdp") if sizes[a] % slices == 0), None)
        if dcn_axis is None:
            raise ValueError(
                f"mesh ({mesh_str_from(sizes)}) spans {slices} TPU slices, but neither "
                f"mesh.data nor mesh.fsdp is a multiple of {slices}. Fix: e.g. "
                f"--config.mesh.data={slices} so that slices exchange only gradients.")
        dcn = tuple(slices if n == dcn_axis else 1 for n in MESH_AXES)
        ici = tuple(s // d for s, d in zip(shape, dcn))
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
        return Mesh(arr, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
