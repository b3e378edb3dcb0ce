"""The training loop: checkpoint/resume, periodic evaluation, early stopping, logging.

`train(run, loss_fn, batches)` is generic over the objective: every trainer passes the `Run`
it built (`ftjax.train.run`), its `loss_fn` and its batch producer. The producer is an
iterator of this process's rows of each global batch, or an on-policy producer that is handed
the current params before each step (`ftjax.train.batches`); either exposes `get_state()` /
`set_state()`, saved with every checkpoint, so a resumed run sees exactly the batches an
uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
import math
import time
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ftjax import hostmem, monitor, sharding
from ftjax import workdir as workdir_lib
from ftjax.peft import core as peft_core
from ftjax.io import fingerprint as base_fingerprint
from ftjax.io.checkpoint import Checkpointer, abstract_with_shardings
from ftjax.train import curves, optim, param_groups
from ftjax.train.batches import draw
from ftjax.train.placement import Placement
from ftjax.train.flops import (FLOPS_FORWARD, FLOPS_FROZEN_BASE, FLOPS_FULL,  # noqa: F401
                               adapter_params_per_token, flops_convention, flops_per_token)
from ftjax.train.run import Run, base_source, host_params, is_host, transform_key  # noqa: F401 (host_params, Placement: re-exported)
from ftjax.train.state import TrainState, create_state
from ftjax.train.step import LossFn, jit_train_step, make_eval_step, make_train_step


# The `train` section: every loop setting with its default (configs/common.py:train builds
# from it; `trainers.resolve_config` fills it into every run's config).
DEFAULTS = dict(
    steps=100,
    batch_size=32,              # global batch (examples / rows), split over data-parallel axes
    seq_len=64,
    accum_steps=1,              # micro-batches per step (gradient accumulation)
    z_loss=0.0,                 # PaLM z-loss coefficient
    log_every=10,
    eval_every=0,               # 0 = only at the end when there is something to evaluate
    checkpoint_every=0,         # 0 = only at the end
    keep_checkpoints=3,
    async_checkpoint=True,
    early_stopping_patience=0,  # evaluations without improvement of the watched metric
                                # (best_metric, else eval_loss); 0 = off
    early_stopping_min_delta=0.0,
    # Best checkpoint (docs/monitoring.md): an evaluation-row key ("eval_loss",
    # "eval_exact_match" from an on_eval callback, ...); "" = off. The best params so far are
    # kept in <workdir>/best (one orbax checkpoint) and early stopping watches this metric.
    best_metric="",
    best_mode="",               # "min" / "max"; "" = "min" if the name contains "loss" or
                                # "perplexity", else "max"
    restore_best=True,          # with best_metric: return the best params, not the last
    # Loss-curve diagnosis (ftjax/train/curves.py): one warning line per episode, also
    # written to metrics.jsonl as split "<name>_warning".
    diagnose=True,
    spike_factor=3.0,           # divergence: loss > factor x median of the last spike_window rows
    spike_window=20,            #   (logged rows)
    overfit_evals=3,            # overfitting: evaluations in a row with eval_loss up, train down
    plateau_window=50,          # plateau: logged rows over which the smoothed loss must improve
    plateau_tol=0.01,           #   by this relative amount
    lr_window=20,               # lr_too_high: logged rows in which the loss zig-zags
    lr_sign_changes=0.5,        #   (fraction of successive differences that flip sign)
    lr_cv=0.2,                  #   with std/|mean| at least this, and no downward trend
    diagnose_floor=0.05,        # spikes / fluctuations smaller than this (nats) are ignored
    progress=True,
    tensorboard=True,
    # Experiment trackers beside metrics.jsonl and TensorBoard, off by default; process 0 logs
    # every scalar as "{split}/{name}" and the resolved config once (ftjax/tracking.py,
    # docs/monitoring.md "Tracking: W&B and MLflow"). Neither writes to a gs:// workdir.
    wandb=False,                # a Weights & Biases run (pip install wandb)
    wandb_project="ftjax",
    wandb_mode="offline",       # "offline" (upload later: wandb sync), "disabled", "online"
    wandb_dir="",               # local directory for the W&B run files; "" = the workdir
    mlflow=False,               # an MLflow run (pip install mlflow-skinny)
    mlflow_uri="",              # tracking URI or local path; "" = file store <workdir>/mlruns
    mlflow_experiment="ftjax",
)
# Refused before a run builds anything (`trainers/_validate.py`: a bound, or the allowed values).
# Across sections it also checks that accum_steps divides batch_size.
CHECKS = dict(
    steps=">= 1", batch_size=">= 1", seq_len=">= 2", accum_steps=">= 1", z_loss=">= 0",
    log_every=">= 1", eval_every=">= 0", checkpoint_every=">= 0", keep_checkpoints=">= 1",
    early_stopping_patience=">= 0", early_stopping_min_delta=">= 0",
    best_mode=("", "min", "max"), restore_best=(True, False), diagnose=(True, False),
    spike_factor="> 1", spike_window=">= 3", overfit_evals=">= 1", plateau_window=">= 4",
    plateau_tol=">= 0", lr_window=">= 4", lr_sign_changes="in [0, 1]", lr_cv=">= 0",
    diagnose_floor=">= 0", wandb=(True, False), mlflow=(True, False),
    wandb_mode=("offline", "disabled", "online"),
)
assert set(curves.DEFAULTS) <= set(DEFAULTS)


def metric_mode(metric: str, mode: str = "") -> str:
    """"min" or "max" for `metric`: `mode` when given, else "min" for names containing
    "loss" or "perplexity" and "max" for anything else (accuracy, exact match, reward)."""
    if mode:
        if mode not in ("min", "max"):
            raise ValueError(f"train.best_mode must be 'min' or 'max' (or '' to infer), "
                             f"got {mode!r}")
        return mode
    low = metric.lower()
    return "min" if ("loss" in low or "perplexity" in low) else "max"


def _improves(value: float, best: Optional[float], mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` (a non-finite value never does)."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class BestCheckpointer(Checkpointer):
    """The best state so far by `train.best_metric`: one checkpoint in `<workdir>/best`, the
    same {state, data} items as the regular ones; its `data` holds
    `{"best": {"step", "metric", "value", "mode"}, "_trainable": ...}`."""

    def __init__(self, workdir: str, *, async_save: bool = True):  # pylint: disable=super-init-not-called
        self.directory = workdir_lib.path(workdir, "best")
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def record(self) -> Optional[dict]:
        """The saved best record ({"step", "metric", "value", "mode"}), or None."""
        step = self.latest_step()
        if step is None:
            return None
        return self.restore_data(step).get("best")

    def clear(self, from_step: int = 0) -> None:
        """Deletes the saved checkpoints at `from_step` or later (waiting for saves first)."""
        self.wait()
        for s in self.all_steps():
            if s >= from_step:
                self.manager.delete(s)


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    history: list[dict]          # one dict per logged step (step, loss, ...)
    evals: list[dict]            # one dict per evaluation (step, eval_loss, ...)
    stopped_early: bool
    resumed_from: Optional[int]
    wall_s: float
    # With train.best_metric: {"step", "metric", "value", "mode"} of the best evaluation (the
    # checkpoint in <workdir>/best); None when off or before any evaluation.
    best: Optional[dict] = None
    # Loss-curve warnings (train.diagnose), each {"kind", "step", "message"}.
    warnings: list[dict] = dataclasses.field(default_factory=list)

    @property
    def params(self) -> Any:
        """The full trained params (trainable and frozen leaves together)."""
        return self.state.full_params()



def _tree_signature_hash(obj: Any) -> str:
    import hashlib
    import json
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _mean_metrics(buf: Sequence[dict]) -> dict:
    """Mean of each metric over logged steps: floats, or nested lists for array metrics
    (MoE per-layer stats)."""
    out = {}
    for k in buf[0].keys():
        m = np.mean(np.stack([np.asarray(b[k], np.float64) for b in buf]), axis=0)
        out[k] = float(m) if m.ndim == 0 else m.tolist()
    return out


def _write_row(writer, step: int, row: dict, prefix: str, moe_prefix: str = "") -> None:
    """Writes scalars as such and array metrics (MoE per-layer stats) as vectors plus their
    per-layer scalar summaries (`monitor.moe_scalars`)."""
    scalars = {k: v for k, v in row.items() if k != "step" and not isinstance(v, list)}
    vectors = {k: v for k, v in row.items() if isinstance(v, list)}
    scalars.update(monitor.moe_scalars(row, moe_prefix))
    writer.write(step, scalars, prefix=prefix, vectors=vectors)


def evaluate(eval_fn, params, placement: Placement, batches: Sequence[dict]) -> dict:
    """Token-weighted eval loss and accuracy over a fixed list of (process-local) batches,
    plus the token-weighted MoE routing metrics (`moe_*`) of MoE models."""
    tot = {"nll": 0.0, "correct": 0.0, "tokens": 0.0}
    moe: dict[str, np.ndarray] = {}
    for b in batches:
        s = jax.device_get(eval_fn(params, placement.put_batch(b)))
        for k in tot:
            tot[k] += float(s[k])
        for k, v in s.items():
            if k.startswith("moe_"):
                moe[k] = moe.get(k, 0.0) + np.asarray(v, np.float64)
    n = max(tot["tokens"], 1.0)
    out = {"loss": tot["nll"] / n, "accuracy": tot["correct"] / n, "tokens": tot["tokens"]}
    out.update({k: (v / n).tolist() for k, v in moe.items()})
    return out


def place_initial_params(run: Run, with_fingerprint: bool = False) -> Any:
    """The run's starting params, transformed and placed with the param shardings: under jit
    for a pure init function, by `device_put` (shard by shard) for loaded host arrays.

    with_fingerprint: also return the fingerprint of the base (the untransformed starting
    params, `ftjax.io.fingerprint`), computed on the placed arrays in the same jit as the
    transform: `(params, fingerprint)`.
    """
    placement, transform = run.placement, run.transform
    tkey = transform_key(run.seed)
    sums = base_fingerprint.summaries if with_fingerprint else (lambda base: None)
    outs = (placement.params, placement.replicated if with_fingerprint else None)
    if is_host(run.init_params):
        dtype = jnp.dtype(run.model_cfg.param_dtype)
        base = jax.device_put(jax.tree.map(lambda x: np.asarray(x, dtype), run.init_params()),
                              placement.base_params)
        if transform is None and not with_fingerprint:
            return base
        fn = lambda b: (transform(b, tkey) if transform else b, sums(b))  # noqa: E731
        params, summaries = jax.jit(fn, out_shardings=outs)(base)
        abstract = base
    else:
        init = run.init_params
        if not with_fingerprint:
            fn = (lambda: transform(init(), tkey)) if transform else init
            return jax.jit(fn, out_shardings=placement.params)()

        def fn():
            base = init()
            return (transform(base, tkey) if transform else base), sums(base)
        params, summaries = jax.jit(fn, out_shardings=outs)()
        abstract = jax.eval_shape(init)
    if not with_fingerprint:
        return params
    return params, base_fingerprint.fingerprint(abstract, summaries)


@dataclasses.dataclass
class StepSetup:
    """What the jitted training step of a run is built from, all abstract (nothing placed):
    the optimizer, the trainable / frozen split, the state's shapes and shardings."""
    tx: Any
    schedule: Callable
    mask: Any                    # bool tree over run.abstract_params: which leaves train
    train_abstract: Any          # trainable leaves (None elsewhere), ShapeDtypeStructs
    frozen_abstract: Any         # frozen leaves (None elsewhere)
    has_frozen: bool
    abstract_state: TrainState   # ShapeDtypeStructs
    state_shardings: Any
    accum_steps: int


def step_setup(run: Run) -> StepSetup:
    """The optimizer, trainable split and abstract state of `run` (as `train` builds them)."""
    cfg, name = run.cfg, run.name
    tcfg = SimpleNamespace(**{**DEFAULTS, **cfg.train.to_dict()})
    accum = int(tcfg.accum_steps)
    tx, sched = optim.make_optimizer(cfg.optimizer, int(tcfg.steps))
    if run.method.wrap_optimizer is not None:
        tx = run.method.wrap_optimizer(tx)
    full_abstract, placement = run.abstract_params, run.placement
    sharding.check_batch_divisible(int(tcfg.batch_size), placement.mesh, placement.rules, accum)

    mask = peft_core.trainable_mask(full_abstract, run.train_patterns)
    mask = param_groups.freeze(mask, cfg.optimizer.get("param_groups", ()))
    train_abs, frozen_abs = peft_core.partition(full_abstract, mask)
    if not jax.tree.leaves(train_abs):
        raise ValueError(f"[{name}] nothing to train: no param matches train_patterns "
                         f"{list(run.train_patterns)} and no adapter was added")
    has_frozen = bool(jax.tree.leaves(frozen_abs))
    abstract_state = jax.eval_shape(
        lambda t, f: create_state(t, tx, run.seed, f if has_frozen else None),
        train_abs, frozen_abs)
    state_sh = sharding.state_shardings(abstract_state, full_abstract, placement.params,
                                        placement.mesh)
    return StepSetup(tx=tx, schedule=sched, mask=mask, train_abstract=train_abs,
                     frozen_abstract=frozen_abs, has_frozen=has_frozen,
                     abstract_state=abstract_state, state_shardings=state_sh,
                     accum_steps=accum)


def jit_step(run: Run, loss_fn: LossFn, setup: StepSetup):
    """The run's jitted training step (explicit shardings, donated state)."""
    return jit_train_step(make_train_step(loss_fn, setup.tx, accum_steps=setup.accum_steps,
                                          schedule=setup.schedule),
                          setup.state_shardings, run.placement.batch)


def train(run: Run, loss_fn: LossFn, batches: Any, *, eval_batches: Sequence[dict] = (),
          on_eval: Optional[Callable[[int, Any], dict]] = None,
          checkpointer: Optional[Checkpointer] = None) -> TrainResult:
    """Runs (or resumes) training as configured by `run.cfg.train` / `run.cfg.optimizer`.

    run: the set-up (`ftjax.train.run.Run`): model config, starting params, transform,
      train patterns, placement, workdir; nothing is re-derived here.
    batches: an iterator of this process's rows of each global batch, or an on-policy
      producer whose `next_batch(step, params)` sees the current params (`train.batches`).
    on_eval: optional extra evaluation `(step, full_params) -> metrics` run with each
      evaluation.
    Leaves that match no train pattern, and leaves of frozen `optimizer.param_groups` (spec
    None), are frozen: no gradients, no optimizer state, not checkpointed.
    With `train.best_metric` the best state so far is kept in `<workdir>/best`, early stopping
    watches that metric, and (`train.restore_best`) the result holds the best params, while the
    last regular checkpoint stays the last step (so a resume continues from there).
    """
    t_start = time.time()
    cfg, name, model_cfg = run.cfg, run.name, run.model_cfg
    tcfg = SimpleNamespace(**{**DEFAULTS, **cfg.train.to_dict()})
    steps = int(tcfg.steps)
    seed = run.seed
    setup = step_setup(run)
    tx, placement, mask = setup.tx, run.placement, setup.mask
    train_abs, has_frozen = setup.train_abstract, setup.has_frozen
    # What a checkpoint must match to be resumed: the trainable leaves' paths and shapes.
    sig_leaves = jax.tree_util.tree_flatten_with_path(train_abs)[0]
    signature = {"n": len(sig_leaves), "size": int(sum(x.size for _, x in sig_leaves)),
                 "hash": _tree_signature_hash([(peft_core.path_str(p), list(x.shape))
                                            for p, x in sig_leaves])}
    abstract_state, state_sh = setup.abstract_state, setup.state_shardings
    workdir, train_iter = run.workdir, batches
    eval_every = int(tcfg.eval_every)
    best_metric = str(tcfg.best_metric or "")
    watch = best_metric or "eval_loss"   # what early stopping watches
    mode = metric_mode(watch, str(tcfg.best_mode or "") if best_metric else "min")
    if best_metric and not (eval_every and (eval_batches or on_eval)):
        raise ValueError(
            f"[{name}] train.best_metric={best_metric!r} needs evaluations: set "
            f"train.eval_every > 0 and give the trainer validation data or an on_eval "
            f"metric, or set train.best_metric=''")

    ckpt = checkpointer or Checkpointer(workdir, max_to_keep=tcfg.keep_checkpoints,
                                        async_save=bool(tcfg.async_checkpoint))
    resumed_from = ckpt.latest_step()
    if resumed_from is not None:
        saved = abstract_with_shardings(abstract_state.replace(frozen=None),
                                        state_sh.replace(frozen=None))
        saved_sig = ckpt.restore_data(resumed_from).get("_trainable")
        if saved_sig is not None and saved_sig != signature:
            raise ValueError(
                f"[{name}] the checkpoint at step {resumed_from} in {ckpt.directory} was written "
                f"with a different set of trainable params ({saved_sig['n']} leaves, "
                f"{saved_sig['size']:,} values) than this run trains ({signature['n']} leaves, "
                f"{signature['size']:,} values): the fine-tuning method or train_patterns "
                "changed. Use a new --workdir, or restore the config the run started with "
                "(the workdir keeps it as config.json / config.<hash>.json).")
        state, data_state = ckpt.restore(resumed_from, saved)
        data_state.pop("_trainable", None)
        base_fp = data_state.pop("_base", None)
        watched = data_state.pop("_early_stopping", None)
        if has_frozen:  # frozen weights are not checkpointed: rebuild them from the base
            rebuilt, now_fp = place_initial_params(run, with_fingerprint=True)
            base_fingerprint.check(base_fp, now_fp, f"[{name}] the base rebuilt to resume "
                                   f"step {resumed_from} of {ckpt.directory} "
                                   f"({base_source(cfg)})")
            state = state.replace(frozen=peft_core.partition(rebuilt, mask)[1])
            del rebuilt
        if hasattr(train_iter, "set_state") and data_state:
            train_iter.set_state(data_state)
        print(f"[{name}] resumed from checkpoint step {resumed_from} in {ckpt.directory}")
    else:
        watched = None
        # Runs with frozen leaves record their base: exports and resumes rebuild it.
        initial, base_fp = (place_initial_params(run, with_fingerprint=True) if has_frozen
                            else (place_initial_params(run), None))
        trainable, frozen = peft_core.partition(initial, mask)
        del initial
        state = jax.jit(lambda t, f: create_state(t, tx, seed, f if has_frozen else None),
                        out_shardings=state_sh)(trainable, frozen)
        del trainable, frozen

    step_fn = jit_step(run, loss_fn, setup)
    eval_fn = jax.jit(make_eval_step(loss_fn))

    writer = monitor.MetricWriter(
        workdir, tensorboard=bool(tcfg.tensorboard), config=cfg,
        tracking={k: v for k, v in vars(tcfg).items() if k.startswith(("wandb", "mlflow"))})
    seq_len = int(tcfg.seq_len)
    tokens_per_step = int(tcfg.batch_size) * seq_len
    peak = float(cfg.get("monitor", {}).get("peak_flops", 0.0) or 0.0)
    # A frozen base with adapters: count what the step computes (4N + 6N_adapter + attention,
    # docs/performance.md "FLOP conventions"); full fine-tuning and frozen plain weights (HFT):
    # PaLM's 6N.
    adapters = adapter_params_per_token(model_cfg, train_abs) if has_frozen else 0.0
    thr = monitor.Throughput(tokens_per_step,
                             flops_per_token(model_cfg, seq_len, adapter_params=adapters or None),
                             peak_flops_per_device=peak or None)
    start = int(jax.device_get(state.step))
    progress = monitor.Progress(steps, start_step=start, desc=name,
                                enabled=None if tcfg.progress else False)
    log_every = int(tcfg.log_every)
    ckpt_every = int(tcfg.checkpoint_every)
    patience = int(tcfg.early_stopping_patience)
    min_delta = float(tcfg.early_stopping_min_delta)
    primary = jax.process_index() == 0
    doctor = curves.CurveDoctor.from_config(tcfg) if tcfg.diagnose else None
    warnings: list[dict] = []

    def report(w: curves.CurveWarning) -> None:
        warnings.append(w.to_dict())
        writer.event(w.step, w.kind, w.message, prefix=f"{name}_warning")
        if primary:
            progress.write(f"[{name}] warning at step {w.step} ({w.kind}): {w.message}")

    # Early stopping: the best watched value and the evaluations since, carried in every
    # regular checkpoint so that a resumed run stops where an uninterrupted one would.
    best, best_step, bad_evals, stopped_early = None, None, 0, False
    if watched and watched.get("metric") == watch:
        best, best_step = watched.get("best"), watched.get("step")
        bad_evals = int(watched.get("bad_evals", 0))
        if patience and bad_evals >= patience:
            stopped_early = True
            print(f"[{name}] the run stopped early at step {start} ({watch} did not improve "
                  f"for {bad_evals} evaluations); raise train.early_stopping_patience (or set "
                  f"it to 0) to train on")
    # The best checkpoint: the record in <workdir>/best is this run's (a fresh start discards
    # one left by an attempt that wrote no regular checkpoint).
    best_ckpt, best_rec = None, None
    if best_metric:
        best_ckpt = BestCheckpointer(workdir, async_save=bool(tcfg.async_checkpoint))
        if resumed_from is None:
            if best_ckpt.all_steps():
                print(f"[{name}] discarding {best_ckpt.directory}: left by an earlier attempt "
                      "that wrote no regular checkpoint")
                best_ckpt.clear()
        else:
            best_rec = best_ckpt.record()
            if best_rec is not None and (best_rec.get("metric") != best_metric
                                         or best_rec.get("mode") != mode):
                print(f"[{name}] {best_ckpt.directory} holds the best by "
                      f"{best_rec.get('metric')} ({best_rec.get('mode')}); this run keeps "
                      f"the best by {best_metric} ({mode}) and will replace it")
                best_rec = None
            elif best_rec is not None:
                print(f"[{name}] best so far: {best_metric} = {best_rec['value']:.6g} at step "
                      f"{best_rec['step']} ({best_ckpt.directory})")

    def save_best(step: int, value: float) -> None:
        nonlocal best_rec
        best_rec = {"step": step, "metric": best_metric, "value": value, "mode": mode}
        if any(s >= step for s in best_ckpt.all_steps()):
            best_ckpt.clear(step)  # a resumed run that beat a later best of an earlier attempt
        best_ckpt.save(step, state.replace(frozen=None),
                       {"best": best_rec, "_trainable": signature}, force=True)

    history, evals, pending = [], [], []
    last_saved = resumed_from
    thr.tick(start)
    step = start
    while step < steps and not stopped_early:
        try:
            batch = placement.put_batch(draw(train_iter, step, state.full_params))
        except BaseException:
            # A producer that fails (a reward function, a data error, an interrupt) must not
            # take the checkpoint being written in the background with it.
            ckpt.wait()
            raise
        state, m = step_fn(state, batch)
        step += 1
        pending.append(m)
        if step == start + 1 and jax.default_backend() == "cpu":
            hostmem.trim()  # the compiler's freed host memory, not kept next to the steps'
        if progress.enabled and step == start + 1 and step % log_every and step != steps:
            # The first step's loss at once (it includes compilation); metrics keep their
            # log_every rows.
            progress.update(step, loss=float(jax.device_get(m["loss"])))
        if step % log_every == 0 or step == steps:
            fetched = jax.device_get(pending)
            pending = []
            row = _mean_metrics(fetched)
            if not all(math.isfinite(row[k]) for k in ("loss", "grad_norm")):
                ckpt.wait()
                raise FloatingPointError(
                    f"[{name}] non-finite loss or gradient at step {step} ({row}); the last good "
                    f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. Lower "
                    f"optimizer.learning_rate, enable optimizer.grad_clip_norm, or use float32.")
            t = thr.tick(step)
            if t:
                row.update(t)
            row["step"] = step
            history.append(row)
            _write_row(writer, step, row, prefix=name)
            if doctor is not None:
                for w in doctor.observe_train(row):
                    report(w)
            extra = {}
            if "moe_aux_loss" in row:  # MoE: balance loss and dropped fraction, layer means
                extra = {"moe_aux": float(np.mean(row["moe_aux_loss"])),
                         "moe_drop": float(np.mean(row["moe_dropped"]))}
            progress.update(step, loss=row["loss"], tokens_per_s=row.get("tokens_per_s"),
                            **extra)
        if eval_every and (step % eval_every == 0 or step == steps) and (eval_batches or on_eval):
            ev = {"step": step}
            if eval_batches:
                ev.update({f"eval_{k}": v for k, v in
                           evaluate(eval_fn, state.full_params(), placement, eval_batches).items()})
            if on_eval is not None:
                ev.update(on_eval(step, state.full_params()))
            evals.append(ev)
            _write_row(writer, step, ev, prefix=f"{name}_eval", moe_prefix="eval_")
            thr.tick(step)  # do not count evaluation time as training throughput
            if best_metric and best_metric not in ev:
                ckpt.wait()
                raise ValueError(
                    f"[{name}] train.best_metric={best_metric!r} is not in the evaluation row "
                    f"at step {step} (keys: {sorted(k for k in ev if k != 'step')}); name one "
                    f"of them")
            if watch in ev:
                value = float(np.asarray(ev[watch]))
                if best_metric and _improves(value, best_rec and best_rec["value"], mode):
                    save_best(step, value)
                if patience:
                    if _improves(value, best, mode, min_delta):
                        best, best_step, bad_evals = value, step, 0
                    else:
                        bad_evals += 1
                        if bad_evals >= patience:
                            stopped_early = True
            if doctor is not None:
                for w in doctor.observe_eval(ev):
                    report(w)
        due = (ckpt_every and step % ckpt_every == 0) or step == steps or stopped_early
        if due and step != last_saved:
            last_saved = step
            data_state = train_iter.get_state() if hasattr(train_iter, "get_state") else {}
            data_state = dict(data_state, _trainable=signature, _base=base_fp,
                              _early_stopping={"metric": watch, "best": best,
                                               "step": best_step, "bad_evals": bad_evals})
            ckpt.save(step, state.replace(frozen=None), data_state, force=True)
        if stopped_early:
            best_txt = "none finite" if best is None else f"{best:.6g} at step {best_step}"
            progress.write(
                f"[{name}] early stopping at step {step}: {watch} has not improved by "
                f"{min_delta} for {patience} evaluations (best {best_txt})")
            break
    progress.close()
    ckpt.wait()
    if best_ckpt is not None:
        best_ckpt.wait()
        if tcfg.restore_best and best_rec is not None:
            why = (f"best {best_metric} = {best_rec['value']:.6g} ({mode}) at step "
                   f"{best_rec['step']}")
            if best_rec["step"] == step:
                print(f"[{name}] returning the params of the last step {step}: {why}")
            else:
                frozen, state = state.frozen, None  # saved in the regular checkpoint: free it
                state = _restore_best(best_ckpt, best_rec["step"], frozen, setup)
                print(f"[{name}] returning the params of step {best_rec['step']}, not of the "
                      f"last step {step}: {why} (train.restore_best; read from "
                      f"{best_ckpt.directory})")
    writer.close()
    return TrainResult(state=state, history=history, evals=evals, stopped_early=stopped_early,
                       resumed_from=resumed_from, wall_s=time.time() - t_start,
                       best=dict(best_rec) if best_rec else None, warnings=warnings)


def _restore_best(best_ckpt: BestCheckpointer, step: int, frozen: Any,
                  setup: StepSetup) -> TrainState:
    """The state saved in the best checkpoint at `step`, placed with the training state's
    shardings; `frozen`: the frozen leaves (not checkpointed; they do not change)."""
    saved = abstract_with_shardings(setup.abstract_state.replace(frozen=None),
                                    setup.state_shardings.replace(frozen=None))
    restored, _ = best_ckpt.restore(step, saved)
    return restored.replace(frozen=frozen)
