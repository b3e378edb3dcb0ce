"""The PEFT vocabulary: the method registry and its defaults, the shared target walk, the
frozen-base protocol, and peft's layering (no model, inference or data imports)."""
import ast
import glob
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models, peft
from ftjax.peft import core, quant
from ftjax.peft.lora import LoRAWeight, apply_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", peft.method_names())
def test_every_method_builds_from_its_defaults(name):
    d = peft.method_defaults(name)
    assert d.method == name
    assert peft.resolve(d).to_dict() == d.to_dict()  # the defaults are a complete section
    assert peft.resolve({"method": name}).to_dict() == d.to_dict()
    m = peft.get_method(d, apply_fn=models.apply)
    assert m.name == name


def test_unknown_keys_and_methods_are_refused_with_close_matches():
    with pytest.raises(ValueError, match=r"'lora' has no setting peft.rnak \(did you mean rank"
                                         r"\?\); its settings are \['alpha'"):
        peft.resolve({"method": "lora", "rnak": 4})
    with pytest.raises(ValueError, match=r"'lorra' is not known \(did you mean"):
        peft.get_method({"method": "lorra"})
    assert peft.resolve(None).method == "full"


def test_forward_changing_methods_need_the_apply_fn_and_text_needs_a_tokenizer():
    for name in ("prompt_tuning", "prefix_tuning"):
        with pytest.raises(ValueError, match="apply_fn=ftjax.models.apply"):
            peft.get_method({"method": name})
    pcfg = {"method": "prompt_tuning", "init": "text", "init_text": "ab"}
    with pytest.raises(ValueError, match="tokenizer=tok"):
        peft.get_method(pcfg, apply_fn=models.apply)

    class Tok:
        def encode(self, text):
            return [ord(ch) - 90 for ch in text]
    m = peft.get_method(pcfg, apply_fn=models.apply, tokenizer=Tok())
    assert m.transform.keywords["init_token_ids"] == [7, 8]
    assert m.apply_fn.keywords["base_apply"] is models.apply


def test_sft_configs_hold_complete_sections():
    """A config's peft section is its method's defaults plus overrides: nothing is missing, so
    every setting is recorded in config.json and overridable from the command line."""
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*_sft.py"))):
        name = os.path.basename(path)[:-3]
        section = importlib.import_module(f"configs.{name}").get_config().peft
        assert section.to_dict() == peft.resolve(section).to_dict(), name


def test_peft_imports_no_model_inference_or_data_and_nothing_inside_functions():
    for path in sorted(glob.glob(os.path.join(ROOT, "ftjax", "peft", "*.py"))):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                names = [a.name for a in node.names]
                for bad in ("ftjax.models", "ftjax.infer", "ftjax.data"):
                    assert not (mod or "").startswith(bad), f"{path} imports {mod}"
                if mod == "ftjax":
                    assert not {"models", "infer", "data"} & set(names), f"{path}: {names}"
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
                assert not inner, f"{path}:{fn.name} imports inside a function"


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    return {"b": {"kernel": jax.random.normal(k[0], (4, 6))},
            "a": {"kernel": jax.random.normal(k[1], (4, 6)), "scale": jnp.ones((6,))},
            "c": jax.random.normal(k[2], (2, 4, 6))}


def test_select_targets_folds_one_key_per_hit_in_tree_order():
    key = jax.random.PRNGKey(3)
    seen = {}

    def make(path, w, k):
        seen[path] = k
        return w * 2
    out = core.select_targets(_params(), [r"(a|b)/kernel", "c"], make, name="test", key=key)
    assert list(seen) == ["a/kernel", "b/kernel", "c"]  # sorted keys, as jax flattens dicts
    for i, path in enumerate(seen, 1):
        np.testing.assert_array_equal(seen[path], jax.random.fold_in(key, i))
    np.testing.assert_array_equal(out["a"]["scale"], _params()["a"]["scale"])  # untouched
    with pytest.raises(ValueError, match=r"match no weight; weight paths are: \['a/kernel', "
                                         r"'a/scale'"):
        core.select_targets(_params(), ["x"], make, name="test")
    with pytest.raises(ValueError, match="test target 'a/scale' is not a dense matrix"):
        core.select_targets(_params(), [".*"], make, name="test")


def test_frozen_base_unwraps_adapters_and_stops_at_bases():
    w = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
    q = quant.quantize(w, "nf4")
    lora = LoRAWeight(base=q, a=jnp.zeros((64, 2)), b=jnp.zeros((2, 8)))
    outer = LoRAWeight(base=lora, a=jnp.zeros((64, 2)), b=jnp.zeros((2, 8)))
    assert outer.frozen_base() is q and core.unwrap(w) is w and core.unwrap(q) is q
    assert core.is_adapter(outer) and not core.is_adapter(q)
    with pytest.raises(ValueError, match="NF4Weight is not an adapter"):
        q.frozen_base()
    assert lora.lora_factors()[0] is lora.a and q.lora_factors() is None
    p = apply_lora({"x": {"kernel": w}}, jax.random.PRNGKey(1), rank=2, targets=("x/kernel",))
    assert p["x"]["kernel"].frozen_base() is w
