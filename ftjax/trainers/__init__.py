"""The trainers: one short file each, its objective, its data and its config section.

All set-up (tokenizer, model config, PEFT method, initial params, placement, workdir, export,
summary) comes from `ftjax.train.run.Run`; the loop from `ftjax.train.loop`. Only
`ftjax.main` imports this package. A new trainer is one module defining
`run(cfg, workdir) -> dict`, registered here (see docs/architecture.md).
"""
from __future__ import annotations

import importlib
from types import ModuleType

# config.trainer -> module defining `run(cfg, workdir) -> summary dict`.
TRAINERS = {
    "sft": "ftjax.trainers.sft",
    "quickstart": "ftjax.trainers.quickstart",
    "classify": "ftjax.trainers.classify",
    "dpo": "ftjax.trainers.dpo",
    "memory_tuning": "ftjax.trainers.memory_tuning",
}


def get(name: str) -> ModuleType:
    """The trainer module for `config.trainer`; unknown names are refused with the choices."""
    if name not in TRAINERS:
        raise ValueError(f"config.trainer={name!r} is not known; choose one of {sorted(TRAINERS)}")
    return importlib.import_module(TRAINERS[name])
