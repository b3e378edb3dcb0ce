"""A sweep as a config file: the base experiment, the axes, the seeds, what to measure.

A sweep file is a Python module with two functions (big_vision's `get_hyper` style):

    def get_config():                      # what the sweep is and how to read its results
        c = ml_collections.ConfigDict()
        c.name = "lora_rank_alpha"
        c.base = "configs/quickstart.py:peft=lora"        # the experiment config (with args)
        c.overrides = ("train.progress=False",)           # applied to every run
        c.metrics = {"em": "exact_match_after"}           # name -> where to read it (below)
        return c

    def get_sweep(h):                      # the runs: a list of {config key: value}
        return h.product([h.sweep("peft.rank", [4, 16]),
                          h.zipit([h.sweep("peft.rslora", [False, True]),
                                   h.sweep("peft.alpha", [8.0, 32.0])]),
                          h.seeds([0, 1, 2])])

`h` (a `Hyper`) builds the axes: `sweep` (one key, its values), `product` (grid), `zipit`
(lists of one length, in step), `chain` (one list after another), `fixed`, `seeds` (the seed
axis: results are averaged over it) and `random` (n samples from distributions, with a seed,
so the same file always gives the same runs). Keys are config paths, with or without a
leading `config.`.

Every run gets a name from its axis values (`rank=4-rslora=False-alpha=8-seed=0`), a
workdir `<sweep dir>/runs/<name>` and a command line (`python -m ftjax.main --config BASE
--workdir ... --config.k=v ...`); the runner, the SLURM array and the TPU launch list all run
exactly these. An axis key `arg.NAME` sets the base config's typed argument NAME instead of a
field (`h.sweep("arg.steps", [150, 400])` runs `configs/X.py:...,steps=150`), for arguments
other fields are computed from. See docs/sweeps.md for `select` (validation-split protocol), `search` and
`analysis`.

Metric paths read a run's results: `exact_match_after` or `other_tasks.format.after` (a
dotted path into its summary.json), `record.wall_s` (its run.json), and
`curve:<split>/<key>:last|min|max|mean` (a column of its metrics.jsonl).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import os
import random as random_lib
import re
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections

__all__ = ["Hyper", "Dist", "Run", "Sweep", "load", "run_name", "cli_value", "SEED_KEY",
           "DEFAULTS"]

SEED_KEY = "seed"
# Axis keys `arg.NAME` set the base config's typed argument NAME (`configs/X.py:NAME=value`)
# rather than a config field: for arguments that other fields are computed from (steps ->
# warm-up, a PEFT method -> its whole `peft` section).
ARG_PREFIX = "arg."
# Axis keys `label.NAME` (from `h.variants`) name and group runs; they are not config fields.
LABEL_PREFIX = "label."
# The axis key `base` replaces the sweep's base config for a run (e.g. a KTO config beside
# DPO ones); `config.overrides` must then hold for every base.
BASE_KEY = "base"
# The sweep config's fields and their defaults (docs/sweeps.md lists what each does).
DEFAULTS = dict(
    name="",                # default: the sweep file's folder name
    title="",
    description="",
    base="",                # the experiment: "configs/X.py[:args]"
    overrides=(),           # "key=value" strings applied to every run, before the axes
    metrics=None,           # name -> metric path (summary / record / curve); (name, path)
                            # pairs keep their order in the report
    dir="",                 # where runs live; default workdirs/sweeps/<name> under the root
    out="",                 # where results.md / results.json / plots go; default: the file's
                            # folder (a relative path is relative to it)
    seed_key=SEED_KEY,      # the config key the seed axis sets
    metrics_file="metrics.jsonl",  # a run's metrics file, relative to its workdir (curve:
                                   # paths, pruning, loss curves); the quickstart's is
                                   # "finetune/metrics.jsonl"
)
_RUN_NAME_OK = re.compile(r"^[A-Za-z0-9_.,=+\-]+$")


def _key(key: str) -> str:
    key = key.strip()
    if key.startswith("config."):
        key = key[len("config."):]
    if not key or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$", key):
        raise ValueError(f"sweep key {key!r} is not a config path like 'optimizer.learning_rate'")
    return key


@dataclasses.dataclass(frozen=True)
class Dist:
    """A distribution for random search: kind in uniform | loguniform | int | choice."""
    kind: str
    low: float = 0.0
    high: float = 0.0
    values: tuple = ()

    def sample(self, rng: random_lib.Random) -> Any:
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        if self.kind == "int":
            return rng.randint(int(self.low), int(self.high))
        if self.kind == "choice":
            return self.values[rng.randrange(len(self.values))]
        raise ValueError(f"unknown distribution kind {self.kind!r}")


class Hyper:
    """The axis builders a sweep file's `get_sweep(h)` (and `get_space(h)`) receives."""

    def __init__(self, seed_key: str = SEED_KEY):
        self.seed_key = seed_key

    @staticmethod
    def sweep(key: str, values: Sequence[Any]) -> list[dict]:
        values = list(values)
        if not values:
            raise ValueError(f"h.sweep({key!r}, ...) needs at least one value")
        k = _key(key)
        return [{k: v} for v in values]

    @staticmethod
    def fixed(key: str, value: Any) -> list[dict]:
        return [{_key(key): value}]

    @staticmethod
    def product(parts: Sequence[list[dict]]) -> list[dict]:
        out = []
        for combo in itertools.product(*parts):
            merged: dict = {}
            for d in combo:
                clash = set(merged) & set(d)
                if clash:
                    raise ValueError(f"h.product: key(s) {sorted(clash)} set by two axes")
                merged.update(d)
            out.append(merged)
        return out

    @staticmethod
    def zipit(parts: Sequence[list[dict]]) -> list[dict]:
        lengths = {len(p) for p in parts}
        if len(lengths) > 1:
            raise ValueError(f"h.zipit needs lists of one length, got lengths "
                             f"{[len(p) for p in parts]}")
        return [{k: v for d in combo for k, v in d.items()} for combo in zip(*parts)]

    @staticmethod
    def chain(parts: Sequence[list[dict]]) -> list[dict]:
        return [d for p in parts for d in p]

    def seeds(self, values: Sequence[int]) -> list[dict]:
        values = [int(v) for v in values]
        if len(set(values)) != len(values):
            raise ValueError(f"h.seeds: repeated seeds in {values}")
        return [{self.seed_key: v} for v in values]

    @staticmethod
    def variants(name: str, options: Mapping[str, Mapping[str, Any]]) -> list[dict]:
        """Named bundles of settings: `h.variants("variant", {"rslora": {"peft.rslora": True},
        "loraplus": {"optimizer.param_groups": ((".*/b", 16.0),)}})`. The label (key
        `label.<name>`) names and groups the runs and is not a config field; keys a label
        determines stay out of run names. Keys one variant sets and another does not keep the
        base config's value in the other."""
        out = []
        for label, settings in options.items():
            out.append({f"{LABEL_PREFIX}{name}": str(label),
                        **{_key(k): v for k, v in settings.items()}})
        return out

    @staticmethod
    def uniform(low: float, high: float) -> Dist:
        return Dist("uniform", float(low), float(high))

    @staticmethod
    def loguniform(low: float, high: float) -> Dist:
        if not 0 < low < high:
            raise ValueError(f"h.loguniform needs 0 < low < high, got {low}, {high}")
        return Dist("loguniform", float(low), float(high))

    @staticmethod
    def randint(low: int, high: int) -> Dist:
        return Dist("int", int(low), int(high))

    @staticmethod
    def choice(values: Sequence[Any]) -> Dist:
        if not values:
            raise ValueError("h.choice needs at least one value")
        return Dist("choice", values=tuple(values))

    @staticmethod
    def random(space: Mapping[str, Dist], n: int, seed: int = 0) -> list[dict]:
        """`n` points drawn from `space` with `seed`: the same file gives the same runs."""
        rng = random_lib.Random(seed)
        keys = [(_key(k), d) for k, d in space.items()]
        return [{k: d.sample(rng) for k, d in keys} for _ in range(int(n))]


def fmt_value(v: Any) -> str:
    """A value as it appears in a run name: floats in %g, the rest in str."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "+".join(fmt_value(x) for x in v)
    return str(v)


def fmt_arg(v: Any) -> str:
    """A value inside a config's argument string (`file.py:k=v,...`): no commas allowed."""
    text = cli_value(v)
    if "," in text:
        raise ValueError(f"config argument value {text!r} contains a comma; set that field "
                         "with a config key instead of an arg.NAME axis")
    return text


def cli_value(v: Any) -> str:
    """A value as `--config.k=<text>` takes it (config_utils.parse_value reads it back)."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return repr(tuple(v))
    return str(v)


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each key's last component, or more components where the last ones collide."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            s = ".".join(parts[-n:])
            if sum(1 for o in keys if o == s or o.endswith("." + s)) == 1:
                out[k] = s
                break
        else:
            out[k] = k
    return out


def run_name(values: Mapping[str, Any], shorts: Mapping[str, str]) -> str:
    name = "-".join(f"{shorts.get(k, k)}={fmt_value(v)}" for k, v in values.items()) or "run"
    name = re.sub(r"[^A-Za-z0-9_.,=+\-]", "_", name)
    return name


@dataclasses.dataclass
class Run:
    """One run of a sweep: its name, stage, axis values and command line."""
    name: str
    values: dict                      # every axis value, the seed included
    stage: str = ""
    seed_key: str = SEED_KEY

    @property
    def seed(self) -> Optional[int]:
        return self.values.get(self.seed_key)

    @property
    def params(self) -> dict:
        """The axis values without the seed: runs that differ only in seed share them."""
        return {k: v for k, v in self.values.items() if k != self.seed_key}

    def overrides(self, base_overrides: Sequence[str] = ()) -> list[str]:
        return ([f"--config.{o.strip()}" for o in base_overrides]
                + [f"--config.{k}={cli_value(v)}" for k, v in self.values.items()
                   if not k.startswith((ARG_PREFIX, LABEL_PREFIX)) and k != BASE_KEY])

    def config_spec(self, base: str) -> str:
        """`base` with this run's `arg.NAME` values added to its typed arguments
        (`configs/quickstart.py:peft=lora` + arg.steps=400 -> `...:peft=lora,steps=400`)."""
        base = str(self.values.get(BASE_KEY, base))
        args = [f"{k[len(ARG_PREFIX):]}={fmt_arg(v)}" for k, v in self.values.items()
                if k.startswith(ARG_PREFIX)]
        if not args:
            return base
        return base + ("," if ".py:" in base else ":") + ",".join(args)

    def to_json(self) -> dict:
        return {"name": self.name, "stage": self.stage, "values": self.values}


def make_runs(points: Sequence[Mapping[str, Any]], *, stage: str = "",
              seed_key: str = SEED_KEY, prefix: str = "") -> list[Run]:
    """Runs from axis points, named from their values; duplicate names are refused."""
    keys: list[str] = []
    for p in points:
        for k in p:
            if k not in keys:
                keys.append(k)
    # A key with a single value across the sweep does not need to be in the name, nor one
    # whose value the `label.*` keys determine.
    labels = [k for k in keys if k.startswith(LABEL_PREFIX)]

    def explained(k: str) -> bool:
        if not labels or k in labels or k == seed_key:
            return False
        seen: dict = {}
        for p in points:
            lab = tuple(repr(p.get(x)) for x in labels)
            if seen.setdefault(lab, repr(p.get(k))) != repr(p.get(k)):
                return False
        return True

    varying = [k for k in keys
               if (len({repr(p.get(k)) for p in points}) > 1 or k == seed_key)
               and not explained(k)]
    shorts = short_keys(varying)
    runs, seen = [], {}
    for p in points:
        name = prefix + run_name({k: p[k] for k in varying if k in p}, shorts)
        if name in seen:
            raise ValueError(f"two runs of the sweep get the name {name!r} "
                             f"({seen[name]} and {dict(p)}): the axes repeat a point")
        seen[name] = dict(p)
        runs.append(Run(name=name, values=dict(p), stage=stage, seed_key=seed_key))
    return runs


@dataclasses.dataclass
class Sweep:
    """A loaded sweep file: its config, its runs and the file it came from."""
    path: str
    config: ml_collections.ConfigDict
    runs: list[Run]
    module: Any

    @property
    def name(self) -> str:
        return str(self.config.name)

    @property
    def metrics(self) -> dict[str, str]:
        """Metric name -> path, in the file's order when given as (name, path) pairs (a
        ConfigDict sorts a dict's keys)."""
        m = self.config.metrics or {}
        pairs = m.items() if hasattr(m, "items") else m
        out = {}
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(f"{self.path}: config.metrics must be a dict or (name, path) "
                                 f"pairs, got {pair!r}")
            out[str(pair[0])] = str(pair[1])
        return out

    def space(self, h: Optional[Hyper] = None) -> dict[str, Dist]:
        """The search space (`get_space(h)` of the file), keys normalised."""
        fn: Optional[Callable] = getattr(self.module, "get_space", None)
        if fn is None:
            raise ValueError(f"{self.path} has no get_space(h): a search needs one, e.g. "
                             "return {'optimizer.learning_rate': h.loguniform(1e-4, 1e-2)}")
        space = fn(h or Hyper(str(self.config.seed_key)))
        return {_key(k): d for k, d in space.items()}


def _root() -> str:
    from ftjax import paths  # pylint: disable=import-outside-toplevel
    return paths.root()


def _import_file(path: str):
    root = _root()
    if root not in sys.path:
        sys.path.insert(0, root)  # sweep files may import configs/*
    name = "ftjax_sweep_" + re.sub(r"\W", "_", os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import sweep file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resolve_path(path: str) -> str:
    """A sweep file path as given, or relative to the ftjax root; a folder means its sweep.py."""
    cands = [path, os.path.join(_root(), path)]
    for c in cands:
        if os.path.isdir(c):
            c = os.path.join(c, "sweep.py")
        if os.path.isfile(c):
            return os.path.abspath(c)
    raise FileNotFoundError(f"no sweep file {path!r} (looked at {cands}); a sweep file is a "
                            "Python file with get_config() and get_sweep(h), see docs/sweeps.md")


def load(path: str) -> Sweep:
    """Imports a sweep file, fills its config's defaults and expands its runs."""
    path = resolve_path(path)
    module = _import_file(path)
    for fn in ("get_config", "get_sweep"):
        if not callable(getattr(module, fn, None)):
            raise ValueError(f"sweep file {path} defines no {fn}(); see docs/sweeps.md")
    cfg = module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise TypeError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    unknown = set(cfg.keys()) - set(DEFAULTS) - {"select", "search", "analysis"}
    if unknown:
        raise ValueError(f"{path}: unknown sweep config field(s) {sorted(unknown)}; known: "
                         f"{sorted(set(DEFAULTS) | {'select', 'search', 'analysis'})}")
    full = ml_collections.ConfigDict(dict(DEFAULTS))
    full.update(cfg)
    if not full.name:
        full.name = os.path.basename(os.path.dirname(path))
    if not full.base:
        raise ValueError(f"{path}: config.base (the experiment config, e.g. "
                         "'configs/quickstart.py') is empty")
    for o in full.overrides:
        if "=" not in o:
            raise ValueError(f"{path}: override {o!r} is not 'key=value'")
    if not full.out:
        full.out = os.path.dirname(path)
    elif not os.path.isabs(full.out) and "://" not in full.out:
        full.out = os.path.join(os.path.dirname(path), full.out)
    if not full.dir:
        full.dir = os.path.join(_root(), "workdirs", "sweeps", str(full.name))
    h = Hyper(str(full.seed_key))
    points = module.get_sweep(h)
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise TypeError(f"{path}: get_sweep(h) must return a list of dicts (build it with "
                        "h.product / h.zipit / h.sweep ...)")
    stage = "select" if "select" in cfg else ""
    runs = make_runs(points, stage=stage, seed_key=str(full.seed_key))
    return Sweep(path=path, config=full, runs=runs, module=module)
