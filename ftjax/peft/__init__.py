"""Parameter-efficient fine-tuning as transforms on the param tree.

Every method is one file that declares its settings with their defaults and registers a
builder (`method.register`); see `method.py` and docs/writing_a_transform.md. A `Method`
bundles what the trainer needs (transform, train patterns, an optional wrapped apply
function, rng binding, optimizer wrapper). The model code never changes when a method is
added, and peft never imports the model: methods that change the forward pass wrap the apply
function given to `get_method`.

    get_method(pcfg, *, apply_fn=None, tokenizer=None) -> Method
    method_defaults(name) -> ConfigDict   the full `peft` section of a method, with defaults
    resolve(pcfg) -> ConfigDict           a section with every default filled in
"""
from ftjax.peft.method import (Method, Spec, get_method, method_defaults, method_names,
                               register, registry, resolve)

__all__ = ["Method", "Spec", "get_method", "method_defaults", "method_names", "register",
           "registry", "resolve", "METHODS"]


def __getattr__(name: str):
    if name == "METHODS":  # name -> module of every registered method
        return {n: s.module for n, s in registry().items()}
    raise AttributeError(f"module 'ftjax.peft' has no attribute {name!r}")
