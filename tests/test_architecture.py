"""The house's import rules (docs/architecture.md) and the quotes of its worked example."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "ftjax")

# room -> the rooms of ftjax it may import (docs/architecture.md, "Rooms").
ALLOWED = {
    "models": {"peft"},
    "peft": set(),
    "sharding": {"models"},
    "data": {"workdir"},
    "eval": {"models", "data", "infer", "sharding", "io", "monitor", "workdir", "paths"},
    "infer": {"models", "data", "peft"},   # peft: the adapter bank's per-row LoRA selection
    "align": {"models", "peft", "data", "sharding", "workdir"},
    "io": {"models", "peft", "workdir"},
    "train": {"models", "peft", "sharding", "data", "io", "eval", "infer", "monitor", "workdir",
              "paths", "hostmem"},
    "workdir": set(), "paths": set(), "hostmem": set(), "monitor": {"workdir", "tracking"},
    "tracking": {"workdir"}, "plots": {"workdir"}, "run_record": {"paths", "workdir"},
}


def _room(path: str) -> str:
    rel = os.path.relpath(path, PKG)
    return rel.split(os.sep)[0].removesuffix(".py")


def _imports(path: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            parts = n.split(".")
            if parts[0] == "ftjax" and len(parts) > 1:
                target = parts[1]
                if os.path.exists(os.path.join(PKG, target)) or \
                        os.path.exists(os.path.join(PKG, target + ".py")):
                    out.add(target)
    return out


def _files():
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def test_no_upward_imports():
    bad = []
    for path in _files():
        room = _room(path)
        if room not in ALLOWED:
            continue  # trainers, main and the CLI sit on top and may import anything
        for target in _imports(path) - ALLOWED[room] - {room}:
            bad.append(f"{os.path.relpath(path, ROOT)} imports ftjax.{target}")
    assert not bad, "\n".join(bad)


def test_only_main_imports_the_trainers():
    users = [os.path.relpath(p, ROOT) for p in _files()
             if _room(p) not in ("trainers", "main") and "trainers" in _imports(p)]
    assert not users, users


def test_no_module_over_600_lines():
    long = {os.path.relpath(p, ROOT): n for p in _files()
            if (n := sum(1 for _ in open(p))) > 600}
    assert not long, long


def test_the_worked_example_quotes_the_real_code():
    doc = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    blocks = re.findall(r"```python\n# (ftjax/\S+\.py)\n(.*?)```", doc, re.S)
    assert len(blocks) >= 3
    for path, code in blocks:
        assert code in open(os.path.join(ROOT, path)).read(), f"{path} no longer has:\n{code}"
