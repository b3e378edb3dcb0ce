"""The set-up every trainer shares, built once from the config: a `Run`.

A trainer (`ftjax/trainers/<name>.py`) is its objective, its data and its config section.
Everything else comes from here:

    run = Run.build(cfg, workdir, name="sft")         # tokenizer, model config, PEFT method,
                                                      # initial params, abstract params, placement
    result = run.train(loss_fn, batches, eval_batches=evals)   # `loop.train(run, ...)`
    run.write_summary({...})                          # process 0 only, any epath workdir
    run.export_hf(result.params)                      # when export.hf_dir is set

`Run` holds no arrays: building it loads nothing (checkpoints are read lazily, only when the
run does not resume), so trainers can inspect shapes and shardings before anything is placed.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

import jax

from ftjax import data as ftdata
from ftjax import models, paths, workdir as wd
from ftjax.io.params_file import load_params
from ftjax.models import upcycle
from ftjax.models.config import ModelConfig
from ftjax.peft import Method, get_method
from ftjax.train.placement import Placement



# ------------------------------------------------------------------------------------------
# Pieces of the set-up (each usable alone, e.g. by scripts)
# ------------------------------------------------------------------------------------------

def resolve_path(src: str, what: str = "model.init_from") -> str:
    """`src` if it exists; a relative path that does not exist under the current directory is
    taken under the ftjax root (`ftjax.paths`: the checkout, or the installed shared files),
    so configs can name shipped files portably."""
    path = paths.resolve(src)
    if "://" in path or os.path.exists(path):
        return path if "://" in path else os.path.abspath(path)
    raise FileNotFoundError(f"{what}={src!r} not found (looked under {os.getcwd()!r} and the "
                            f"ftjax root {_root()!r})")


def _root() -> str:
    try:
        return paths.root()
    except FileNotFoundError as e:
        return str(e)


def model_config(model_section: Any, dense: bool = False,
                 log: Callable[[str], None] = print) -> ModelConfig:
    """ModelConfig from a config's `model` section (every field but `init_from`, `upcycle`).

    With `init_from="hf:DIR"` the architecture comes from DIR/config.json and only the
    run-time fields (dtype, param_dtype, scan_layers, remat) from the section; overridden
    section fields are reported through `log` (see docs/checkpoints.md). An enabled `model.upcycle` section
    turns it into the sparse MoE the run trains (`ftjax.models.upcycle`), unless `dense`.
    """
    fields = {k: v for k, v in model_section.to_dict().items()
              if k not in ("init_from", "upcycle")}
    src = model_section.get("init_from", "") or ""
    if src.startswith("hf:"):
        from ftjax.io.hf import model_config_from_section
        base = model_config_from_section(fields, src[len("hf:"):], log=log)
    else:
        base = ModelConfig.from_dict(fields)
    return base if dense else upcycle.config_from_section(model_section.get("upcycle"), base)


def host_params(load_fn: Callable[[], Any]) -> Callable[[], Any]:
    """Marks an init function that returns host arrays (a loaded checkpoint).

    The loop then places its result with `device_put` onto the param shardings (each device
    receives only its shard) instead of running it under jit, where loaded weights would
    become compile-time constants. Its shapes come from the model config, so nothing is
    loaded when the run resumes from a checkpoint.
    """
    load_fn.on_host = True
    return load_fn


def is_host(init_params: Callable[[], Any]) -> bool:
    return bool(getattr(init_params, "on_host", False))


def initial_params(cfg: Any, model_cfg: ModelConfig) -> Callable[[], Any]:
    """A zero-argument function returning the starting params (random init or `init_from`),
    upcycled into experts when `model.upcycle` is enabled (before any PEFT transform)."""
    sec = cfg.model.get("upcycle")
    if not upcycle.enabled(sec):
        return dense_initial_params(cfg, model_cfg)
    dense_cfg = model_config(cfg.model, dense=True)
    load = dense_initial_params(cfg, dense_cfg)
    key = upcycle.upcycle_key(int(cfg.seed))
    fn = lambda: upcycle.upcycle_from_section(sec, load(), dense_cfg, key)[0]
    return host_params(fn) if is_host(load) else fn


def dense_initial_params(cfg: Any, model_cfg: ModelConfig) -> Callable[[], Any]:
    """The starting params of `model_cfg` before upcycling (random init or `init_from`).

    Checkpoints are read lazily (only when the run does not resume) and marked with
    `host_params`, so the loop places the host arrays shard by shard.
    """
    src = cfg.model.get("init_from", "")
    if not src:
        return lambda: models.init(model_cfg, jax.random.PRNGKey(int(cfg.seed)))
    if src.startswith("hf:"):
        def load_hf():
            from ftjax.io.hf import load_pretrained
            hf_cfg, params = load_pretrained(src[len("hf:"):], dtype=model_cfg.param_dtype)
            runtime = ("dtype", "param_dtype", "scan_layers", "remat", "init_std")
            diff = {k: (v, getattr(model_cfg, k)) for k, v in hf_cfg.to_dict().items()
                    if k not in runtime and getattr(model_cfg, k) != v}
            if diff:  # model_config derives the architecture from the same config.json
                raise ValueError(f"model.init_from={src!r} holds a different architecture than "
                                 "the model config: " + ", ".join(
                                     f"{k}: checkpoint {a!r}, configured {b!r}"
                                     for k, (a, b) in diff.items()))
            return params
        return host_params(load_hf)

    path = resolve_path(src)

    def load_file():
        _, params = load_params(path, expected_cfg=model_cfg)
        return params
    return host_params(load_file)


def base_source(cfg: Any) -> str:
    """Where a run's base weights come from, for messages."""
    src = cfg.model.get("init_from", "") or ""
    return f"model.init_from={src!r}" if src else f"the seeded random init (seed {int(cfg.seed)})"


def tokenizer_for(cfg: Any):
    """The checkpoint's own tokenizer when starting from a Hugging Face directory that has
    one (`tokenizer.json`); the built-in character tokenizer otherwise."""
    src = cfg.model.get("init_from", "")
    if src.startswith("hf:") and os.path.exists(os.path.join(src[3:], "tokenizer.json")):
        return ftdata.HFTokenizer.from_dir(src[3:])
    return ftdata.CharTokenizer()


def check_exportable(cfg: Any, method: Optional[Method] = None) -> None:
    """Refuses `export.hf_dir` (one line, before any work) for a PEFT method with no merged
    Hugging Face form; `method` defaults to the config's (built without loading anything)."""
    if not cfg.get("export", {}).get("hf_dir", ""):
        return
    if method is None:
        method = get_method(cfg.get("peft"), apply_fn=models.apply,
                            tokenizer=ftdata.CharTokenizer())
    if method.apply_fn is not None:
        raise ValueError(f"export.hf_dir: peft.method={method.name!r} changes the model's "
                         "inputs (virtual tokens / prefixes) and has no merged Hugging Face "
                         "form; unset export.hf_dir and keep the ftjax checkpoint")
    if not method.mergeable:
        raise ValueError(f"export.hf_dir: peft.method={method.name!r} has no merged Hugging "
                         "Face form (its weights cannot be folded into dense ones); unset "
                         "export.hf_dir and keep the ftjax checkpoint")


def check_vocab(model_cfg: ModelConfig, tok) -> None:
    if model_cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size}; set --config.model.vocab_size={tok.vocab_size}")


def transform_key(seed: int) -> jax.Array:
    """The key a run's PEFT transform is applied with (export tools rebuild adapters with it)."""
    return jax.random.PRNGKey(seed + 1)


def gather(params: Any) -> Any:
    """The whole params on every process (generation and export run per process on a
    gathered copy); the params themselves on one process."""
    if jax.process_count() == 1:
        return params
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(params, tiled=True)


# ------------------------------------------------------------------------------------------
# The Run
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """One training run's set-up: what `loop.train` needs, derived once from the config.

    init_params: returns the starting params (random init or a checkpoint, marked with
      `host_params` when it returns host arrays); called only when there is no checkpoint to
      resume, or to rebuild frozen weights on resume.
    transform: `(params, key) -> params'` applied to the placed starting params under jit
      (the PEFT method's transform, plus what the trainer adds, e.g. a classification head).
    train_patterns: regexes over param paths of the plain leaves that train; fields of
      structured weights train as their class says. Everything else is frozen.
    abstract_params: the transformed params as ShapeDtypeStructs.
    """
    cfg: Any
    workdir: str
    name: str
    model_cfg: ModelConfig
    method: Method
    init_params: Callable[[], Any]
    transform: Optional[Callable[[Any, jax.Array], Any]]
    train_patterns: tuple[str, ...]
    abstract_params: Any
    placement: Placement
    tokenizer: Any = None

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def build(cls, cfg: Any, workdir: str, *, name: str = "train", tokenizer: Any = None,
              model_cfg: Optional[ModelConfig] = None,
              init_params: Optional[Callable[[], Any]] = None, method: Optional[Method] = None,
              add_params: Optional[Callable[[Any, jax.Array], dict]] = None,
              add_patterns: Sequence[str] = (), devices=None) -> "Run":
        """The run a config describes.

        tokenizer / model_cfg / init_params / method: given explicitly to override what the
          config says (e.g. the quickstart's character tokenizer, or a test's method).
        add_params: `(transformed_params, key) -> {top_key: subtree}` new top-level params a
          trainer adds after the PEFT transform (e.g. a classification head); they are
          replicated and train (`add_patterns` default to every leaf under them).
        """
        tok = tokenizer if tokenizer is not None else tokenizer_for(cfg)
        model_cfg = model_cfg or model_config(cfg.model)
        check_vocab(model_cfg, tok)
        if method is None:
            method = get_method(cfg.get("peft"), apply_fn=models.apply, tokenizer=tok)
        return cls._assemble(cfg, workdir, name=name, model_cfg=model_cfg, method=method,
                             init_params=init_params or initial_params(cfg, model_cfg),
                             add_params=add_params, add_patterns=add_patterns,
                             devices=devices, tokenizer=tok)

    @classmethod
    def of(cls, cfg: Any, workdir: str, *, model_cfg: ModelConfig,
           init_params: Callable[[], Any], transform=None, train_patterns=(".*",),
           wrap_optimizer=None, name: str = "train", devices=None) -> "Run":
        """A run assembled from explicit parts and no tokenizer, for code that brings its own
        model and batches (tests, benchmarks, notebooks): `cfg` supplies only the train,
        optimizer, mesh and sharding sections and the seed."""
        if wrap_optimizer is None and cfg.get("peft") is not None:
            configured = get_method(cfg.peft, apply_fn=models.apply)
            if configured.wrap_optimizer is not None:  # never fall back to plain fine-tuning
                raise ValueError(f"[{name}] peft.method={configured.name!r} acts on the "
                                 "optimizer; pass wrap_optimizer=method.wrap_optimizer (or use "
                                 "Run.build, which takes the method from the config)")
        method = Method(name="custom", transform=transform, train_patterns=tuple(train_patterns),
                        wrap_optimizer=wrap_optimizer)
        return cls._assemble(cfg, workdir, name=name, model_cfg=model_cfg, method=method,
                             init_params=init_params, devices=devices)

    @classmethod
    def _assemble(cls, cfg, workdir, *, name, model_cfg, method, init_params, add_params=None,
                  add_patterns=(), devices=None, tokenizer=None) -> "Run":
        transform = method.transform
        patterns = tuple(method.train_patterns)
        if add_params is not None:
            transform = _with_added(transform, add_params)
        base_abstract = (models.param_shapes(model_cfg) if is_host(init_params)
                         else jax.eval_shape(init_params))
        tkey = transform_key(int(cfg.seed))
        abstract = (jax.eval_shape(transform, base_abstract, tkey) if transform
                    else base_abstract)
        extra = sorted(set(abstract) - set(base_abstract)) if add_params is not None else []
        if add_params is not None:
            patterns += tuple(add_patterns) or tuple(f"{k}/.*" for k in extra)
        placement = Placement(cfg, model_cfg, devices, abstract_params=abstract,
                              replicated_keys=extra)
        return cls(cfg=cfg, workdir=str(workdir), name=name, model_cfg=model_cfg, method=method,
                   init_params=init_params, transform=transform, train_patterns=patterns,
                   abstract_params=abstract, placement=placement, tokenizer=tokenizer)

    # -- what trainers use -------------------------------------------------------------------

    @property
    def apply_fn(self) -> Callable[..., Any]:
        """The forward pass the method trains through (`models.apply` or its wrapper)."""
        return self.method.apply_fn or models.apply

    @property
    def changes_inputs(self) -> bool:
        """Whether the method changes what the model sees (prompt / prefix tuning)."""
        return self.method.apply_fn is not None

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    def starting_params(self) -> Any:
        """The transformed starting params, placed on the mesh (e.g. for a before-training
        evaluation or a frozen reference copy)."""
        from ftjax.train import loop
        return loop.place_initial_params(self)

    def train(self, loss_fn, batches, *, eval_batches: Sequence[dict] = (), on_eval=None,
              checkpointer=None):
        """`loop.train(self, ...)`: train (or resume) and return a `TrainResult`."""
        from ftjax.train.eval_tasks import task_evaluator  # the config's `eval.tasks`
        from ftjax.train import loop
        tasks = task_evaluator(self)
        if tasks is not None:
            on_eval = tasks if on_eval is None else _both(on_eval, tasks)
        return loop.train(self, loss_fn, batches, eval_batches=eval_batches, on_eval=on_eval,
                          checkpointer=checkpointer)

    def check_exportable(self) -> None:
        """Fails before training when `export.hf_dir` is set for a method with no merged form."""
        check_exportable(self.cfg, self.method)

    def export_hf(self, params: Any) -> Optional[str]:
        """Writes the trained model as a complete Hugging Face directory when `export.hf_dir`
        is set: merged weights, config, the run's tokenizer files and the chat template it
        trained with (`ftjax.train.export`)."""
        out = self.cfg.get("export", {}).get("hf_dir", "")
        if not out:
            return None
        self.check_exportable()
        from ftjax.peft.core import merge
        from ftjax.train import export
        params = gather(params)
        if jax.process_index() == 0:
            name, template = export.trained_template(self.cfg, self.tokenizer)
            export.save_model(out, self.model_cfg, jax.device_get(merge(params)),
                              self.tokenizer, template)
            print(f"exported the trained model to {out} (Hugging Face weights, config, "
                  f"tokenizer files, chat template {name!r})")
        return out

    def write_summary(self, summary: dict, name: str = "summary.json") -> None:
        """`summary` as JSON in the workdir (process 0 writes; any epath workdir)."""
        wd.write_json(self.workdir, name, summary)

    def prepare_data(self):
        """The config's data section through the data pipeline (`prepare_data`)."""
        return prepare_data(self.cfg, self.tokenizer, self.workdir)


def prepare_data(cfg: Any, tok, workdir: str):
    """`pipeline.prepare` of `cfg.data` on every process; process 0 builds new sources first
    (one writer), the others then read what it built."""
    from ftjax.data import pipeline
    seq_len = int(cfg.train.seq_len)
    if jax.process_count() == 1:
        return pipeline.prepare(cfg.data, tok, workdir, seq_len=seq_len)
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
        prepared = pipeline.prepare(cfg.data, tok, workdir, seq_len=seq_len)
    multihost_utils.sync_global_devices("ftjax_data_prepared")
    if jax.process_index() != 0:
        prepared = pipeline.prepare(cfg.data, tok, workdir, seq_len=seq_len, verbose=False)
    return prepared


def _both(first, second):
    """Two `on_eval` callbacks as one (their metrics merged)."""
    return lambda step, params: {**first(step, params), **second(step, params)}


def _with_added(transform, add_params):
    """The PEFT transform (if any) on the model's params with the run's key unchanged, then
    the trainer's new top-level params."""
    def fn(params, key):
        out = transform(params, key) if transform is not None else dict(params)
        return {**out, **add_params(out, key)}
    return fn


def uses_files(cfg: Any) -> bool:
    """Whether the data section names the user's data (`source` / `sources`)."""
    d = cfg.get("data", {})
    return bool(d.get("source", "") or d.get("sources", ()))


def fixed_batches(examples: Sequence[dict], tok, batch_size: int, seq_len: int) -> list[dict]:
    """Every (prompt/answer) example once, in fixed batches (the last one padded with empty
    rows): this process's rows of each, for evaluation losses."""
    it = ftdata.SyntheticLoader(examples, tok, batch_size, seq_len, seed=0, shuffle=False,
                                process_index=jax.process_index(),
                                process_count=jax.process_count(), drop_remainder=False,
                                num_epochs=1)
    return list(it)


def synthetic_loader(examples: Sequence[dict], tok, cfg: Any):
    """The resumable, seeded training loader over in-memory prompt/answer examples."""
    t = cfg.train
    return ftdata.SyntheticLoader(list(examples), tok, int(t.batch_size), int(t.seq_len),
                                  int(cfg.seed), process_index=jax.process_index(),
                                  process_count=jax.process_count())
