"""The trainers: one short file each, its objective, its data and its config section.

All set-up (tokenizer, model config, PEFT method, initial params, placement, workdir, export,
summary) comes from `ftjax.train.run.Run`; the loop from `ftjax.train.loop`. Only
`ftjax.main` imports this package. A new trainer is one module defining
`run(cfg, workdir) -> dict` (and, for its own config section, `DEFAULTS`); its file name is
the `config.trainer` that selects it, with no registration anywhere else (see
docs/architecture.md).
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def names() -> list[str]:
    """Every trainer: the modules of this package (helpers start with an underscore)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str) -> ModuleType:
    """The trainer module for `config.trainer` (`ftjax/trainers/<name>.py`, which defines
    `run(cfg, workdir) -> dict`); unknown names are refused with the choices."""
    if name not in names():
        raise ValueError(f"config.trainer={name!r} is not known; choose one of {names()}")
    module = importlib.import_module(f"{__name__}.{name}")
    if not callable(getattr(module, "run", None)):
        raise ValueError(f"ftjax/trainers/{name}.py defines no run(cfg, workdir); a trainer "
                         "module must (helper modules start with an underscore)")
    return module


def resolve_config(cfg, overrides=()):
    """The experiment's config with every declared default filled in, then the command-line
    `overrides` ((key, text) pairs) applied: what config.json records and the hash covers.

    - `peft`: the method's settings with their defaults (`ftjax.peft.resolve`); a
      `peft.method` override switches the section to that method's defaults first, so its
      settings (`--config.peft.rank=4`) can be set on the same command line.
    - the engine's sections (`train`: `train/loop.py:DEFAULTS`, `optimizer`:
      `train/optim.py:DEFAULTS`) and the trainer's own (`DEFAULTS = {section: {key: default}}`
      of its module).
    - `data.template="auto"`: the tokenizer's own chat template when the run starts from a
      Hugging Face checkpoint (`model.init_from=hf:DIR`), else the built-in "plain".
    Unknown or misspelled keys (in the file or on the command line) are refused, naming them.
    """
    import copy

    import ml_collections

    from ftjax import config_utils, peft

    cfg = copy.deepcopy(cfg)
    overrides = list(overrides.items() if isinstance(overrides, dict) else overrides)
    switch = [v for k, v in overrides if k == "peft.method"]
    if "trainer" in dict(overrides):
        cfg.trainer = dict(overrides)["trainer"]
    if switch and (cfg.get("peft") is None or switch[-1] != cfg.peft.get("method", "full")):
        keep = {k: cfg.peft[k] for k in ("train_patterns",) if cfg.get("peft") is not None
                and k in cfg.peft}
        cfg.peft = ml_collections.ConfigDict(dict(method=switch[-1]))
        cfg.peft = peft.resolve(cfg.peft)
        for k, v in keep.items():
            if k in cfg.peft:
                cfg.peft[k] = v
    cfg.peft = peft.resolve(cfg.get("peft"))
    _fill_trainer_defaults(cfg)
    cfg = config_utils.apply_overrides(cfg, [(k, v) for k, v in overrides
                                             if k not in ("peft.method", "trainer")])
    cfg.peft = peft.resolve(cfg.peft)  # types of the settings set on the command line
    data = cfg.get("data")
    if data is not None and data.get("template") == "auto":
        # A run from a Hugging Face checkpoint uses that tokenizer's chat template (""); the
        # quickstart base and random inits use the quickstart's "plain" layout.
        from_hf = str(cfg.model.get("init_from", "") or "").startswith("hf:")
        data.template = "" if from_hf else "plain"
    return cfg


def _fill_trainer_defaults(cfg) -> None:
    import difflib

    import ml_collections

    from ftjax.train import loop, optim
    defaults = {"train": loop.DEFAULTS, "optimizer": optim.DEFAULTS,
                **getattr(get(cfg.get("trainer", "sft")), "DEFAULTS", {})}
    for section, fields in defaults.items():
        given = cfg.get(section)
        given = {} if given is None else given.to_dict()
        unknown = sorted(set(given) - set(fields))
        if unknown:
            hints = [f"{section}.{k}" + (f" (did you mean {', '.join(c)}?)" if (
                c := difflib.get_close_matches(k, sorted(fields), n=3)) else "") for k in unknown]
            raise ValueError(f"trainer {cfg.get('trainer')!r} has no setting {'; '.join(hints)}; "
                             f"the {section!r} section's settings are {sorted(fields)}")
        cfg[section] = ml_collections.ConfigDict({**fields, **given})
