"""Any model ftjax can evaluate, loaded and placed on a mesh: `load_model(spec)`.

A spec is one of
  - an ftjax workdir: the latest (or `step`) checkpoint of the run it holds, with its PEFT
    weights unmerged and its forward pass (prompt / prefix tuning included), its tokenizer
    and the chat template it trained with (`ftjax.train.restore_run`);
  - a Hugging Face directory (config.json + safetensors + tokenizer files; every ftjax
    export is one), optionally with a PEFT adapter directory on top (`adapter`);
  - an ftjax params file (`.safetensors` written by `ftjax.io.params_file`), with the
    character tokenizer unless `tokenizer` names an HF tokenizer directory.

The params are placed with the shardings training would give them (the workdir's own mesh
and rules, or the `mesh` / `sharding` sections passed in), so evaluation never needs the
whole model on one device.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import ml_collections

from ftjax import models
from ftjax.models.config import ModelConfig

__all__ = ["EvalModel", "load_model", "mesh_sections"]


@dataclasses.dataclass
class EvalModel:
    """A model ready to evaluate: params placed by `placement`, its tokenizer, forward pass,
    chat template (Jinja source or None) and where it came from (for reports)."""
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    placement: Any
    apply_fn: Optional[Callable] = None
    template: Optional[str] = None
    source: dict = dataclasses.field(default_factory=dict)


def mesh_sections(data: int = -1, fsdp: int = 1, tensor: int = 1,
                  rules: str = "fsdp") -> ml_collections.ConfigDict:
    """A config with just the `mesh` and `sharding` sections a `Placement` reads."""
    return ml_collections.ConfigDict(dict(
        mesh=dict(data=data, fsdp=fsdp, tensor=tensor),
        sharding=dict(rules=rules)))


def _placement(layout: Any, cfg: ModelConfig, params: Any, devices=None):
    from ftjax.train.placement import Placement
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return Placement(layout, cfg, devices, abstract_params=abstract)


def _is_workdir(path: str) -> bool:
    from ftjax import workdir as wd
    if "://" in path:
        return True
    return os.path.isdir(path) and (wd.exists(path, "config.json") and not os.path.exists(
        os.path.join(path, "model.safetensors")) and not os.path.exists(
        os.path.join(path, "model.safetensors.index.json"))
        or os.path.isdir(os.path.join(path, "checkpoints"))
        or any(os.path.isdir(os.path.join(path, d, "checkpoints")) for d in os.listdir(path)))


def load_model(path: str, *, adapter: Optional[str] = None, step: Optional[int] = None,
               tokenizer: Optional[str] = None, layout: Any = None,
               dtype: Optional[str] = None, devices=None) -> EvalModel:
    """The model at `path` (workdir, HF directory or params file), placed on a mesh.

    layout: a config with `mesh` and `sharding` sections (default: a workdir's own, else
    all devices data-parallel with FSDP rules: `mesh_sections()`).
    adapter: a PEFT adapter directory applied to an HF directory's weights.
    devices: the devices of the mesh (default: all).
    """
    if _is_workdir(path):
        if adapter:
            raise ValueError(f"--adapter applies to a Hugging Face directory; {path!r} is an "
                             "ftjax workdir, whose adapters are loaded from its checkpoint")
        return _from_workdir(path, step, layout, devices)
    if step is not None:
        raise ValueError(f"step={step} applies to an ftjax workdir; {path!r} is not one")
    if os.path.isdir(path):
        return _from_hf(path, adapter, tokenizer, layout, dtype, devices)
    if os.path.isfile(path):
        if adapter:
            raise ValueError("--adapter applies to a Hugging Face directory, not a params file")
        return _from_params_file(path, tokenizer, layout, devices)
    raise FileNotFoundError(f"model {path!r} is neither an ftjax workdir, a Hugging Face "
                            "directory nor a params file")


def _from_workdir(path: str, step: Optional[int], layout: Any, devices=None) -> EvalModel:
    from ftjax.config_record import config_hash
    from ftjax.io.restore import find_run
    from ftjax.train.export import trained_template
    from ftjax.train.restore_run import restore_run
    run_dir, note = find_run(path)
    if note:
        print(note)
    r = restore_run(run_dir, step)
    layout = layout if layout is not None else r.run_cfg
    placement = _placement(layout, r.model_cfg, r.params, devices)
    params = placement.put_params(r.params)
    name, template = trained_template(r.run_cfg, r.tokenizer)
    return EvalModel(cfg=r.model_cfg, params=params, tokenizer=r.tokenizer,
                     placement=placement, apply_fn=r.method.apply_fn, template=template,
                     source={"kind": "workdir", "path": os.fspath(run_dir), "step": r.step,
                             "peft": r.method.name, "config_hash": config_hash(r.run_cfg),
                             "template": name})


def _from_hf(path: str, adapter: Optional[str], tokenizer: Optional[str], layout: Any,
             dtype: Optional[str], devices=None) -> EvalModel:
    from ftjax.data import CharTokenizer, HFTokenizer
    from ftjax.io.hf import load_pretrained
    cfg, params = load_pretrained(path, dtype=dtype)
    tok_dir = tokenizer or path
    tok = (HFTokenizer.from_dir(tok_dir) if os.path.exists(os.path.join(tok_dir, "tokenizer.json"))
           else CharTokenizer())
    source = {"kind": "hf", "path": os.path.abspath(path)}
    if adapter:
        from ftjax.io.peft_format import load_peft_adapter
        params = load_peft_adapter(adapter, cfg, params)
        source["adapter"] = os.path.abspath(adapter)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer of {tok_dir} has {tok.vocab_size} ids but the model "
                         f"only {cfg.vocab_size} embeddings; pass the model's own tokenizer")
    placement = _placement(layout if layout is not None else mesh_sections(), cfg, params,
                           devices)
    template = getattr(tok, "chat_template", None)
    return EvalModel(cfg=cfg, params=placement.put_params(params), tokenizer=tok,
                     placement=placement, template=template, source=source)


def _from_params_file(path: str, tokenizer: Optional[str], layout: Any,
                      devices=None) -> EvalModel:
    from ftjax.data import CharTokenizer, HFTokenizer
    from ftjax.io.params_file import load_params
    from ftjax.train.export import recorded_template
    cfg, params = load_params(path)
    tok = HFTokenizer.from_dir(tokenizer) if tokenizer else CharTokenizer()
    name, template, _ = recorded_template(path)
    placement = _placement(layout if layout is not None else mesh_sections(), cfg, params,
                           devices)
    return EvalModel(cfg=cfg, params=placement.put_params(params), tokenizer=tok,
                     placement=placement, template=template,
                     source={"kind": "params_file", "path": os.path.abspath(path),
                             "template": name})


def engine_for(model: EvalModel, **kw):
    """An `ftjax.eval.engine.Engine` over the model's placed params."""
    from ftjax.eval.engine import Engine
    return Engine(model.params, model.cfg, model.tokenizer, placement=model.placement,
                  apply_fn=model.apply_fn, **kw)


_ = models  # models.apply is the default forward pass of EvalModel.apply_fn=None
