"""What the server answers with: the base model, its LoRA adapters, and their versions.

Model names: the base is `NAME` (`--name`, default the checkpoint folder's name); adapter
`A` is `NAME:A`. Every response carries the version of what answered: the base's source
(workdir + step + config hash, an HF directory, a params file; and its quantization) and,
for an adapter, its path and revision (a workdir's step and config hash, or the SHA-256 of a
PEFT directory's weights). `system_fingerprint` is a short hash of that version.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any

import numpy as np

from ftjax.infer.adapters import AdapterBank
from ftjax.peft.core import StructuredWeight, map_weights

__all__ = ["Registry", "load_adapter_tree", "fingerprint"]


def fingerprint(version: dict) -> str:
    return "fp_" + hashlib.sha256(json.dumps(version, sort_keys=True).encode()).hexdigest()[:12]


def _sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain_leaves(tree: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    map_weights(lambda p, w: out.__setitem__(p, w), tree)
    return out


def load_adapter_tree(path: str, cfg: Any, base_params: Any) -> tuple[Any, dict]:
    """(LoRA params tree over `base_params`, version) from a PEFT adapter directory or an
    ftjax LoRA workdir."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        from ftjax.io.peft_format import load_peft_adapter
        tree = load_peft_adapter(path, cfg, base_params)
        weights = [f for f in ("adapter_model.safetensors", "adapter_model.bin")
                   if os.path.isfile(os.path.join(path, f))]
        rev = _sha256_of(os.path.join(path, weights[0]))[:16] if weights else "unknown"
        version = {"kind": "peft", "path": os.path.abspath(path), "revision": rev}
        _refuse_full_weights(tree, base_params, path)
        return tree, version
    from ftjax.config_record import config_hash
    from ftjax.io.restore import find_run
    from ftjax.train.restore_run import restore_run
    try:
        run_dir, _ = find_run(path)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"adapter {path!r} is neither a PEFT adapter directory "
                         f"(adapter_config.json) nor an ftjax workdir: {e}") from None
    r = restore_run(run_dir, None)
    if r.method.name not in ("lora", "qlora"):
        raise ValueError(f"{path}: an ftjax {r.method.name!r} run; only LoRA runs can be "
                         "served as adapters (export a merged model and serve that instead)")
    shape_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads")
    if any(getattr(r.model_cfg, k) != getattr(cfg, k) for k in shape_keys):
        raise ValueError(f"{path}: its model (" + ", ".join(
            f"{k} {getattr(r.model_cfg, k)}" for k in shape_keys) + ") is not the served base")
    run_path = os.fspath(run_dir)
    version = {"kind": "workdir",
               "path": run_path if "://" in run_path else os.path.abspath(run_path), "step": r.step,
               "config_hash": config_hash(r.run_cfg)}
    return r.params, version


def _refuse_full_weights(tree: Any, base: Any, path: str) -> None:
    """A PEFT adapter that replaces whole weights (modules_to_save) cannot share the base."""
    new, old = _plain_leaves(tree), _plain_leaves(base)
    for p, w in new.items():
        if isinstance(w, StructuredWeight) or p not in old or w is old[p]:
            continue
        if getattr(w, "shape", None) != getattr(old[p], "shape", None) or \
                not np.array_equal(np.asarray(w), np.asarray(old[p])):
            raise ValueError(f"adapter {path!r} replaces the full weight {p} (modules_to_save "
                             "or trained biases); it cannot share the base with other "
                             "adapters: serve it as its own model")


class Registry:
    """The served names and their versions; owns the adapter bank (None: no adapters)."""

    def __init__(self, name: str, cfg: Any, base_params: Any, base_version: dict, *,
                 max_adapters: int = 0, max_lora_rank: int = 16):
        if not name or ":" in name:
            raise ValueError(f"model name {name!r} must be non-empty and without ':'")
        self.name, self.cfg, self.base_version = name, cfg, dict(base_version)
        self._base = base_params
        self.bank = (AdapterBank(base_params, capacity=max_adapters, max_rank=max_lora_rank)
                     if max_adapters > 0 else None)
        self.adapter_versions: dict[str, dict] = {}
        self._lock = threading.Lock()

    @property
    def params(self) -> Any:
        """What the engine runs: the bank's params (with adapters) or the base."""
        return self.bank.params if self.bank is not None else self._base

    def models(self) -> list[dict]:
        out = [{"id": self.name, "version": self.base_version}]
        for a, v in sorted(self.adapter_versions.items()):
            out.append({"id": f"{self.name}:{a}", "parent": self.name, "version": v})
        return out

    def resolve(self, model: str) -> tuple[int, dict]:
        """(adapter index or -1, version) of a model name; KeyError when unknown."""
        if model == self.name:
            return -1, {"base": self.base_version}
        base, sep, adapter = model.partition(":")
        if sep and base == self.name and self.bank is not None and \
                adapter in self.adapter_versions:
            return self.bank.index(adapter), {"base": self.base_version,
                                              "adapter": self.adapter_versions[adapter]}
        raise KeyError(model)

    def add_adapter(self, name: str, path: str, busy=()) -> dict:
        if self.bank is None:
            raise ValueError("this server was started without adapter slots; restart it with "
                             "--max-adapters N (N > 0)")
        tree, version = load_adapter_tree(path, self.cfg, self._base)
        with self._lock:
            self.bank.add(name, tree, busy=busy)
            self.adapter_versions[name] = version
        return version

    def remove_adapter(self, name: str) -> None:
        if self.bank is None or name not in self.adapter_versions:
            raise KeyError(name)
        with self._lock:
            self.bank.remove(name)
            del self.adapter_versions[name]
