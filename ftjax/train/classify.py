"""Sequence classification fine-tuning (trainer "classify").

The backbone is the causal LM (`models.apply(..., return_hidden=True)`); a new trainable head
`cls_head/{kernel [d, C], bias [C]}` reads the final hidden state of each row's last real
token. Full fine-tuning or any PEFT method: the method transforms the backbone and the head
is added to its train_patterns. Losses: cross-entropy, class-weighted cross-entropy or focal
loss (`ftjax.train.losses`); eval: accuracy, per-class/macro precision, recall, F1, PR-AUC
(`ftjax.eval.classification`).

Batch layout (classification): `inputs` int32 [B, T] (the tokens, right-padded), `segment_ids`
int32 [B, T] (1 on real tokens, 0 on padding), `positions` int32 [B, T], `label` int32 [B]
and `label_weight` float32 [B] (0 on padding rows). `label`/`label_weight` may also arrive as
[B, 1]; the loop's batch sharding needs rank >= 2, so rank-1 leaves are given a trailing axis
before they reach it (`as_rank2`).

Where the head lives: a top-level `cls_head` subtree of params. The loop derives shardings
from the model's own param tree, which has no such key, so `HeadPlacement` adds replicated
shardings for it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import models, sharding
from ftjax.models.config import ModelConfig
from ftjax.peft import get_method
from ftjax.train import loop
from ftjax.train.losses import classification_cross_entropy, focal_loss
from ftjax.train.step import LossFn

HEAD = "cls_head"
LOSSES = ("ce", "weighted", "focal")
CLASSIFY_KEYS = ("inputs", "segment_ids", "positions", "label", "label_weight")


# ------------------------------------------------------------------------------------------
# The head
# ------------------------------------------------------------------------------------------

def init_head(key: jax.Array, hidden_size: int, num_classes: int, std: float = 0.02) -> dict:
    """`{"kernel": N(0, std) [d, C], "bias": zeros [C]}` in float32."""
    if num_classes < 2:
        raise ValueError(f"classification needs at least 2 classes, got {num_classes}")
    return {"kernel": std * jax.random.normal(key, (hidden_size, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}


def with_head(transform: Optional[Callable], hidden_size: int, num_classes: int,
              std: float = 0.02) -> Callable[[Any, jax.Array], Any]:
    """A params transform that applies the PEFT `transform` (if any) to the backbone with the
    run's transform key unchanged, then adds a fresh head (from a key folded off it)."""
    def fn(params, key):
        out = transform(params, key) if transform is not None else dict(params)
        return {**out, HEAD: init_head(jax.random.fold_in(key, 0x636C73), hidden_size,
                                       num_classes, std)}
    return fn


def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """[B] index of each row's last real (segment id != 0) token; 0 for an all-padding row."""
    t = segment_ids.shape[-1]
    real = segment_ids != 0
    last = t - 1 - jnp.argmax(real[:, ::-1], axis=-1)
    return jnp.where(real.any(-1), last, 0)


def head_logits(head: dict, hidden: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, C] float32 logits from the hidden state [B, T, d] at each row's last real token."""
    idx = last_token_index(segment_ids)
    h = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return h @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)


def classify_logits(params: Any, model_cfg: ModelConfig, batch: dict,
                    apply_fn: Optional[Callable] = None) -> jax.Array:
    """Backbone + head: [B, C] logits of a classification batch."""
    apply_fn = apply_fn or models.apply
    backbone = {k: v for k, v in params.items() if k != HEAD}
    _, aux = apply_fn(backbone, model_cfg, batch["inputs"], positions=batch.get("positions"),
                      segment_ids=batch["segment_ids"], return_hidden=True)
    return head_logits(params[HEAD], aux["hidden"], batch["segment_ids"])


def classify_loss(model_cfg: ModelConfig, loss: str = "ce", *,
                  class_weight: Optional[Sequence[float]] = None, gamma: float = 2.0,
                  alpha: Optional[Sequence[float]] = None, apply_fn=None,
                  bind_rng=None) -> LossFn:
    """The trainer's `loss_fn(params, batch, rng) -> (objective_sum, stats)`; stats["tokens"]
    is the number of (weighted) examples, so the step averages per example.

    loss: "ce" (plain), "weighted" (cross-entropy with `class_weight` [C]) or "focal" (gamma,
    optional per-class `alpha`).
    """
    if loss not in LOSSES:
        raise ValueError(f"classify.loss={loss!r} is not known; choose one of {LOSSES}")
    if loss == "weighted" and class_weight is None:
        raise ValueError("classify.loss='weighted' needs class weights")
    cw = None if class_weight is None else np.asarray(class_weight, np.float32)
    al = None if alpha is None else np.asarray(alpha, np.float32)

    def loss_fn(params, batch, rng):
        if bind_rng is not None and rng is not None:
            params = bind_rng(params, rng)
        logits = classify_logits(params, model_cfg, batch, apply_fn)
        labels = batch["label"].reshape(-1)
        w = batch.get("label_weight")
        w = None if w is None else w.reshape(-1)
        if loss == "focal":
            s = focal_loss(logits, labels, w, gamma=gamma, alpha=al)
        else:
            s = classification_cross_entropy(logits, labels, w,
                                             cw if loss == "weighted" else None)
        return s["nll"], s

    return loss_fn


# ------------------------------------------------------------------------------------------
# Placement and batches
# ------------------------------------------------------------------------------------------

class HeadPlacement(loop.Placement):
    """The loop's Placement for params with a `cls_head` subtree (replicated: it is tiny)."""

    def __init__(self, cfg: Any, model_cfg: ModelConfig, abstract_params: Any, devices=None):
        backbone = {k: v for k, v in abstract_params.items() if k != HEAD}
        super().__init__(cfg, model_cfg, devices, abstract_params=backbone)
        head_axes = jax.tree.map(lambda x: (None,) * len(x.shape), abstract_params[HEAD])
        self.axes = {**self.axes, HEAD: head_axes}
        self.params = {**self.params,
                       HEAD: sharding.param_shardings(head_axes, self.mesh, self.rules)}


def as_rank2(batch: dict) -> dict:
    """Rank-1 leaves ([B]) -> [B, 1], so one [batch, ...] sharding fits every leaf."""
    return {k: (v[:, None] if np.ndim(v) == 1 else v) for k, v in batch.items()}


class PassthroughIterator:
    """Wraps a resumable batch iterator, passing each batch through `attach`; forwards
    get_state/set_state/close to the wrapped iterator (so the loop's resume state is the
    inner loader's). Subclasses override `attach`."""

    def __init__(self, inner: Iterator[dict]):
        self.inner = inner

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.attach(next(self.inner))

    def attach(self, batch: dict) -> dict:
        raise NotImplementedError

    def get_state(self) -> dict:
        return self.inner.get_state() if hasattr(self.inner, "get_state") else {}

    def set_state(self, state: dict) -> None:
        if hasattr(self.inner, "set_state"):
            self.inner.set_state(state)

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()


class Rank2Iterator(PassthroughIterator):
    """Applies `as_rank2` to every batch of the wrapped iterator."""

    def attach(self, batch: dict) -> dict:
        return as_rank2(batch)


def encode_rows(token_lists: Sequence[np.ndarray], labels: Sequence[int], seq_len: int,
                pad_id: int = 0) -> dict:
    """Classification rows from token lists (one example per row, right-padded)."""
    b = len(token_lists)
    out = {"inputs": np.full((b, seq_len), pad_id, np.int32),
           "segment_ids": np.zeros((b, seq_len), np.int32),
           "positions": np.zeros((b, seq_len), np.int32),
           "label": np.asarray(labels, np.int32).reshape(b),
           "label_weight": np.ones((b,), np.float32)}
    for i, t in enumerate(token_lists):
        n = len(t)
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens but seq_len={seq_len}; raise "
                             "train.seq_len or tokenize with max_len=seq_len")
        if n == 0:
            raise ValueError(f"example {i} has no tokens")
        out["inputs"][i, :n] = t
        out["segment_ids"][i, :n] = 1
        out["positions"][i, :n] = np.arange(n)
    return out


class ArrayLoader:
    """In-memory classification batches: seeded per-epoch shuffles (or stratified batches),
    this process's rows of every global batch, and a JSON-able resume state.

    For tests and small in-memory data; the real-data path is `pipeline.make_loader`.
    """

    def __init__(self, tokens: Sequence[np.ndarray], labels: Sequence[int], batch_size: int,
                 seq_len: int, seed: int = 0, *, pad_id: int = 0, shuffle: bool = True,
                 stratified: bool = False, process_index: int = 0, process_count: int = 1):
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} is not divisible by the "
                             f"{process_count} processes")
        if len(tokens) < batch_size:
            raise ValueError(f"{len(tokens)} examples are fewer than one batch of {batch_size}")
        self.tokens, self.labels = list(tokens), np.asarray(labels, np.int64)
        self.batch_size, self.seq_len, self.seed, self.pad_id = batch_size, seq_len, seed, pad_id
        self.shuffle, self.stratified = shuffle, stratified
        self.rows = slice(process_index * batch_size // process_count,
                          (process_index + 1) * batch_size // process_count)
        self.epoch, self.step_in_epoch = 0, 0
        self._order = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> np.ndarray:
        from ftjax.data.imbalance import stratified_batches
        from ftjax.data.splits import hash_order
        n, b = len(self.labels), self.batch_size
        if self.stratified:
            return stratified_batches(self.labels, b, seed=self.seed * 1000003 + epoch)
        order = hash_order(n, self.seed, salt=epoch) if self.shuffle else np.arange(n)
        return order[:n // b * b].reshape(-1, b)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.step_in_epoch >= len(self._order):
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self._order = self._epoch_batches(self.epoch)
        idx = self._order[self.step_in_epoch][self.rows]
        self.step_in_epoch += 1
        return encode_rows([self.tokens[i] for i in idx], self.labels[idx], self.seq_len,
                           self.pad_id)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def set_state(self, state: dict) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self._order = self._epoch_batches(self.epoch)


def eval_rows(tokens: Sequence[np.ndarray], labels: Sequence[int], batch_size: int,
              seq_len: int, *, pad_id: int = 0, process_index: int = 0,
              process_count: int = 1) -> list[dict]:
    """Every example once, in fixed batches; the last is padded with label_weight-0 rows.
    Returns this process's rows of each batch."""
    n = len(tokens)
    out = []
    lo = process_index * batch_size // process_count
    hi = (process_index + 1) * batch_size // process_count
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        pad = batch_size - len(idx)
        toks = [tokens[i] for i in idx] + [np.array([pad_id], np.int32)] * pad
        labs = [int(labels[i]) for i in idx] + [0] * pad
        rows = encode_rows(toks, labs, seq_len, pad_id)
        rows["label_weight"][len(idx):] = 0.0
        out.append({k: v[lo:hi] for k, v in rows.items()})
    return out


# ------------------------------------------------------------------------------------------
# Prediction and metrics
# ------------------------------------------------------------------------------------------

def make_predict(model_cfg: ModelConfig, placement: loop.Placement, apply_fn=None):
    """A function `(full_params, batches) -> (probs [N, C], labels [N])` over a list of
    process-local batches, skipping padding rows; outputs are replicated on every process."""
    def fwd(params, batch):
        logits = classify_logits(params, model_cfg, batch, apply_fn)
        return (jax.nn.softmax(logits, -1), batch["label"].reshape(-1),
                batch["label_weight"].reshape(-1))
    fn = jax.jit(fwd, out_shardings=placement.replicated)

    def predict(params, batches: Sequence[dict]):
        probs, labels = [], []
        for b in batches:
            p, y, w = jax.device_get(fn(params, placement.put_batch(as_rank2(b))))
            keep = np.asarray(w) > 0
            probs.append(np.asarray(p)[keep])
            labels.append(np.asarray(y)[keep])
        return np.concatenate(probs), np.concatenate(labels)
    return predict


def train_classifier(cfg: Any, workdir: str, *, model_cfg: ModelConfig, init_params,
                     num_classes: int, train_iter, eval_batches: Sequence[dict] = (),
                     loss: str = "ce", class_weight=None, gamma: float = 2.0, alpha=None,
                     class_names: Optional[Sequence[str]] = None, devices=None,
                     name: str = "classify"):
    """Runs `loop.train` with the head, the chosen loss and per-eval classification metrics.
    Returns (TrainResult, predict) where predict(params, batches) gives probs and labels."""
    from ftjax.eval.classification import classification_metrics
    method = get_method(cfg.get("peft"))
    std = float(getattr(model_cfg, "init_std", 0.02) or 0.02)
    transform = with_head(method.transform, model_cfg.hidden_size, num_classes, std)
    on_host = getattr(init_params, "on_host", False)
    base = models.param_shapes(model_cfg) if on_host else jax.eval_shape(init_params)
    abstract = jax.eval_shape(transform, base, loop.transform_key(int(cfg.seed)))
    placement = HeadPlacement(cfg, model_cfg, abstract, devices)
    predict = make_predict(model_cfg, placement, method.apply_fn)
    patterns = tuple(method.train_patterns) + (f"{HEAD}/.*",)
    eval_b = [as_rank2(b) for b in eval_batches]

    def on_eval(step, params):
        if not eval_batches:
            return {}
        probs, labels = predict(params, eval_batches)
        m = classification_metrics(labels, probs, class_names)
        return {"macro_f1": m["macro_f1"], "macro_recall": m["macro_recall"],
                "macro_pr_auc": m["macro_pr_auc"]}

    result = loop.train(cfg, workdir, model_cfg=model_cfg, init_params=init_params,
                        loss_fn=classify_loss(model_cfg, loss, class_weight=class_weight,
                                              gamma=gamma, alpha=alpha,
                                              apply_fn=method.apply_fn,
                                              bind_rng=method.bind_rng),
                        train_iter=Rank2Iterator(train_iter), eval_batches=eval_b, name=name,
                        placement=placement, on_eval=on_eval, transform=transform,
                        train_patterns=patterns, wrap_optimizer=method.wrap_optimizer,
                        devices=devices)
    return result, predict


# ------------------------------------------------------------------------------------------
# The trainer on a config (`python -m ftjax.main --config configs/classify_file.py ...`)
# ------------------------------------------------------------------------------------------

def class_counts(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Count of each class (in class-list order) among `labels`."""
    from collections import Counter
    c = Counter(str(x) for x in labels)
    return np.array([c[k] for k in classes], np.int64)


def loss_weights(kcfg: Any, counts: np.ndarray, classes: Sequence[str]):
    """(class_weight, alpha) for the configured loss: class weights for "weighted", and for
    "focal" when classify.focal_alpha="class_weights"."""
    from ftjax.data.imbalance import class_weights
    loss = kcfg.get("loss", "ce")
    alpha_mode = kcfg.get("focal_alpha", "none") or "none"
    if alpha_mode not in ("none", "class_weights"):
        raise ValueError(f"classify.focal_alpha={alpha_mode!r}; use 'none' or 'class_weights'")
    if loss == "weighted" or (loss == "focal" and alpha_mode == "class_weights"):
        w = class_weights(dict(zip(classes, counts)), kcfg.get("class_weights", "inverse"),
                          float(kcfg.get("beta", 0.999)))
        # class_weights returns sorted-label order; put it back into class-list order
        order = {c: i for i, c in enumerate(sorted(classes, key=str))}
        w = np.array([w[order[c]] for c in classes])
        return (w, None) if loss == "weighted" else (None, w)
    return None, None


def run(cfg: Any, workdir: str) -> dict:
    from ftjax.data import pipeline
    from ftjax.eval.classification import classification_metrics, format_metrics
    from ftjax.train.sft import initial_params, model_config, tokenizer_for
    if cfg.get("export", {}).get("hf_dir", ""):
        raise ValueError("export.hf_dir: a classification head has no place in a causal-LM "
                         "Hugging Face export; unset export.hf_dir (the ftjax checkpoint holds "
                         "the head)")
    kcfg = cfg.classify
    if kcfg.get("loss", "ce") not in LOSSES:
        raise ValueError(f"classify.loss={kcfg.loss!r} is not known; choose one of {LOSSES}")
    tok = tokenizer_for(cfg)
    model_cfg = model_config(cfg.model)
    if model_cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size}; set --config.model.vocab_size={tok.vocab_size}")
    t = cfg.train
    bsz, seq_len, seed = int(t.batch_size), int(t.seq_len), int(cfg.seed)
    pi, pc = jax.process_index(), jax.process_count()
    prepared = pipeline.prepare(cfg.data, tok, workdir, seq_len=seq_len)
    if prepared.kind != "classification":
        raise ValueError(f"trainer 'classify' needs classification data ({{text, label}}); "
                         f"the data is of kind {prepared.kind!r} (set data.format="
                         "'classification' and map the fields with data.field_map)")
    classes = list(prepared.labels)
    counts = class_counts(prepared.split_labels["train"], classes)
    cw, alpha = loss_weights(kcfg, counts, classes)
    print("classify: classes " + ", ".join(f"{c}={n}" for c, n in zip(classes, counts))
          + f" (train); loss {kcfg.loss}"
          + ("" if cw is None else " class weights " + np.array2string(cw, precision=3))
          + ("" if alpha is None else " alpha " + np.array2string(alpha, precision=3)))
    eval_split = cfg.data.get("eval_split", "validation")
    eval_b = (pipeline.eval_batches(prepared, eval_split, tok, bsz, seq_len, pi, pc)
              if eval_split in prepared.splits else [])
    train_iter = pipeline.make_loader(prepared, "train", tok, bsz, seq_len, seed, pi, pc)
    result, predict = train_classifier(
        cfg, workdir, model_cfg=model_cfg, init_params=initial_params(cfg, model_cfg),
        num_classes=len(classes), train_iter=train_iter, eval_batches=eval_b,
        loss=kcfg.loss, class_weight=cw, gamma=float(kcfg.get("gamma", 2.0)), alpha=alpha,
        class_names=classes)
    if hasattr(train_iter, "close"):
        train_iter.close()
    metrics = {}
    for split in [s for s in (eval_split, "test") if s in prepared.splits]:
        batches = eval_b if split == eval_split else pipeline.eval_batches(
            prepared, split, tok, bsz, seq_len, pi, pc)
        probs, labels = predict(result.params, batches)
        metrics[split] = classification_metrics(labels, probs, classes)
        print(f"[{split}] " + format_metrics(metrics[split]))
    summary = {"loss": kcfg.loss, "classes": classes, "train_counts": counts.tolist(),
               "class_weight": None if cw is None else cw.tolist(),
               "alpha": None if alpha is None else alpha.tolist(),
               "final_loss": result.history[-1]["loss"] if result.history else None,
               "evals": result.evals, "metrics": metrics, "wall_s": result.wall_s,
               "stopped_early": result.stopped_early, "resumed_from": result.resumed_from}
    if pi == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
