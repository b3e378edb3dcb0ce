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

    from ftjax import config_utils, peft

    cfg = copy.deepcopy(cfg)
    overrides = list(overrides.items() if isinstance(overrides, dict) else overrides)
    given = dict(overrides)
    if "trainer" in given:  # the trainer decides which sections get which defaults
        cfg.trainer = given["trainer"]
    method = given.get("peft.method")
    if method is not None and method != (cfg.get("peft") or {}).get("method", "full"):
        # Switch to the new method's section; train_patterns the file set still apply.
        patterns = (cfg.get("peft") or {}).get("train_patterns")
        cfg.peft = peft.method_defaults(method)  # an unknown method is refused here
        if patterns is not None and "train_patterns" in cfg.peft:
            cfg.peft.train_patterns = patterns
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
    """Every declared section with its defaults under what the config set; unknown keys are
    refused like unknown command-line keys."""
    import ml_collections

    from ftjax import config_utils
    from ftjax.train import loop, optim
    defaults = {"train": loop.DEFAULTS, "optimizer": optim.DEFAULTS,
                **getattr(get(cfg.get("trainer", "sft")), "DEFAULTS", {})}
    from ftjax.eval.evaluate import DEFAULTS as eval_defaults  # tasks run with evaluations
    defaults["eval"] = eval_defaults
    for section, fields in defaults.items():
        given = cfg.get(section)
        given = {} if given is None else given.to_dict()
        for key in sorted(set(given) - set(fields)):
            raise ValueError(config_utils.unknown_key_message(key, list(fields), section,
                                                              f"{section}.{key}"))
        cfg[section] = ml_collections.ConfigDict({**fields, **given})


def validate_config(cfg) -> None:
    """Refuses a resolved config before anything is built: non-finite numbers anywhere,
    values outside the rules declared beside the defaults (`CHECKS` of `train/loop.py`,
    `train/optim.py`, the trainer and the PEFT method), and the rules across sections. One
    ValueError, one line naming each key, its value and the fix (`trainers/_validate.py`)."""
    from ftjax.trainers import _validate
    _validate.validate(cfg)
