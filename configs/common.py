"""Pieces shared by config files: typed `get_config` arguments.

Use in a config file:

    from configs import common

    def get_config(arg=None):
        arg = common.parse_arg(arg, model="llama", rank=16, lora=True)
        ...

and launch with `--config configs/lora_sft.py:model=gemma,rank=8`.
"""

from ftjax.config_utils import pack_arg, parse_arg

__all__ = ["parse_arg", "pack_arg"]


# --------------------------------------------------------------------------------------------
# Config sections shared by experiments. Every field exists up front, so any of them can be
# overridden from the command line (`--config.optimizer.learning_rate=1e-4`), and typos fail.
# --------------------------------------------------------------------------------------------

import ml_collections

from ftjax.models.config import preset as _model_preset
from ftjax.train import loop as _loop
from ftjax.train import optim as _optim


def model(family: str = "llama", size: str | None = None, **fields) -> ml_collections.ConfigDict:
    """All ModelConfig fields of a family preset, plus `init_from` (a checkpoint to start from)."""
    cfg = _model_preset(family, size, **fields).to_dict()
    cfg["init_from"] = ""
    return ml_collections.ConfigDict(cfg)


def optimizer(name: str = "adamw", learning_rate: float = 1e-3, **kw) -> ml_collections.ConfigDict:
    """Optimizer + schedule: every setting of `ftjax/train/optim.py:DEFAULTS` (names: adamw adam
    sgd adafactor lion rmsprop adagrad; schedules: constant linear cosine, each with linear
    warmup; grad_clip_norm 0 disables clipping; param_groups freeze / scale per path)."""
    cfg = dict(_optim.DEFAULTS, name=name, learning_rate=learning_rate)
    _check_known("optimizer", kw, cfg)
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def warmup(steps_wanted: int, train_steps: int) -> int:
    """Warmup steps for a run of `train_steps`: `steps_wanted`, shortened so that a short run
    (e.g. `:steps=5`) still has a step after its warmup (the schedule decays after it)."""
    return max(0, min(steps_wanted, train_steps - 1))


def train(steps: int = 100, batch_size: int = 32, seq_len: int = 64, **kw) -> ml_collections.ConfigDict:
    """Loop settings (`ftjax/train/loop.py:DEFAULTS`): global batch (examples), accumulation,
    logging, eval, checkpoints, the best checkpoint by an eval metric (`best_metric`,
    `best_mode`, `restore_best`), early stopping, loss-curve warnings (`diagnose`, ...;
    docs/monitoring.md)."""
    cfg = dict(_loop.DEFAULTS, steps=steps, batch_size=batch_size, seq_len=seq_len)
    _check_known("train", kw, cfg)
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def _check_known(section: str, kw: dict, known: dict) -> None:
    unknown = sorted(set(kw) - set(known))
    if unknown:
        raise ValueError(f"common.{section}: unknown field(s) {unknown}; known: {sorted(known)}")


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, rules: str = "fsdp"):
    """(mesh, sharding) sections: axis sizes (one may be -1: all remaining devices) and the
    logical-axis rule preset (dp, fsdp, fsdp_tp, tp) or an explicit list of pairs."""
    return (ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)),
            ml_collections.ConfigDict(dict(rules=rules)))


def distributed() -> ml_collections.ConfigDict:
    """Multi-host runtime. Leave empty on TPU pods and SLURM (auto-detected)."""
    return ml_collections.ConfigDict(dict(coordinator_address=None, num_processes=None,
                                          process_id=None, cpu_collectives="gloo"))


def base(trainer: str = "sft", seed: int = 0) -> ml_collections.ConfigDict:
    """A complete experiment skeleton; configs fill in model/data and adjust the rest."""
    c = ml_collections.ConfigDict()
    c.trainer = trainer
    c.seed = seed
    c.model = model()
    c.optimizer = optimizer()
    c.train = train()
    c.mesh, c.sharding = mesh()
    c.distributed = distributed()
    c.monitor = ml_collections.ConfigDict(dict(peak_flops=0.0))
    # Fine-tuning method (ftjax.peft.METHODS). `train_patterns`: regexes of plain params that
    # train besides the method's own (for "full", empty = every param). PEFT methods read
    # their own fields with defaults (see configs/lora_sft.py and the other *_sft.py).
    c.peft = ml_collections.ConfigDict(dict(method="full", train_patterns=()))
    # Deployment: write the trained model as a Hugging Face directory ("" = no export).
    c.export = ml_collections.ConfigDict(dict(hf_dir=""))
    return c


def data_file(source: str = "", format: str = "auto", **kw) -> ml_collections.ConfigDict:
    """The `data` section of a run on the user's own data (ftjax/data/pipeline.py; docs/data.md).

    Every knob exists up front so it can be overridden on the command line, e.g.
    `--config.data.source=csv:my.csv --config.data.field_map=instruction=question,output=answer`.
    """
    cfg = dict(
        # -- where the examples come from --------------------------------------------------
        source=source,          # one spec: jsonl:PATH json:PATH csv:PATH parquet:PATH text:PATH
                                # tfds:NAME[/CONFIG][:SPLIT] (PATH may be a glob or a,b,c)
        sources=(),             # or several: ({"source": SPEC, "weight": w, "format": F,
                                #   "field_map": {...}, "split": S}, ...); weights = the train
                                #   mixture proportions (none given: sources are concatenated)
        format=format,          # auto instruction chat sharegpt preference unpaired
                                # classification text
        field_map="",           # renames: "canonical=field,..." (e.g. "output=answer")
        source_split="train",   # the source's own split (TFDS; slicing like "train[:50%]")
        text_unit="line",       # text: sources: one example per line / paragraph / file
        on_error="raise",       # malformed lines / records missing a field: raise (file,
                                #   line, snippet) | skip (counted in the report)
        data_dir="",            # prepared ArrayRecord sources; "" = <workdir>/data
        # -- formatting and tokenization --------------------------------------------------
        template="",            # "" = the tokenizer's chat template, else the fitting built-in
                                # (alpaca for the char tokenizer); or alpaca chatml llama3, or
                                # Jinja source
        max_len=0,              # tokens per example (0 = train.seq_len + 1, one full row)
        truncation="right",     # right | left | error | "prompt=left,completion=right"
        # -- packing ------------------------------------------------------------------------
        packing="best_fit",     # best_fit | first_fit | none (one example per row)
        pack_window=1024,       # examples packed together (the streaming buffer)
        pack_overflow="truncate",  # an example longer than a row: truncate | drop | error
        # -- cleaning (ftjax/data/clean.py CleanConfig) ---------------------------------------
        clean=dict(nfkc=True, strip_control=True, whitespace="normalize",
                   pii="email+phone+ipv4+ipv6",  # "" disables masking
                   exact_dedup=True,
                   near_dup_threshold=0.0,  # MinHash Jaccard threshold; 0 = off (e.g. 0.8)
                   num_perm=128, bands=0, shingle="word", ngram=3,  # MinHash LSH (bands 0 = auto)
                   min_chars=1, max_chars=0,  # 0 = no maximum
                   min_tokens=0, max_tokens=0),
        # -- splits (ftjax/data/splits.py) ----------------------------------------------------
        splits=dict(ratios=(0.8, 0.2),   # train, validation[, test]; (1.0,) = no validation
                    stratify=True,        # by label for classification / unpaired data
                    kfold=0, fold=0,      # k > 0: K-fold, validation = fold `fold`
                    seed=0),
        # -- imbalance (ftjax/data/imbalance.py; train split only) --------------------------
        imbalance=dict(oversample="",       # "" | "balanced" (repeat minority labels)
                       undersample="",      # "" | "balanced" (drop majority labels)
                       mixture_examples=0,  # draws per mixture epoch (0 = sum of sources)
                       stratify_batches=False),  # classification: every batch stratified
        labels=(),              # classification class list (empty = the labels in the data)
        # -- the loader -------------------------------------------------------------------------
        num_workers=0,          # Grain worker processes (0 = in the training process)
        read_threads=2,         # Grain reader threads
        min_train_examples=1000,  # the report warns below this
        seed=0,                 # mixture / resampling seed (the shuffle uses config.seed)
        # -- held-out evaluation of the SFT trainer ---------------------------------------------
        eval_split="validation",
        eval_examples=200,      # exact match by greedy generation (sft data; 0 = off)
        max_new_tokens=16,
        eval_before=False,      # also score the starting model (before -> after)
    )
    for k, v in kw.items():
        if k not in cfg:
            raise ValueError(f"data_file: unknown field {k!r}; known: {sorted(cfg)}")
        cfg[k] = dict(cfg[k], **v) if isinstance(cfg[k], dict) and isinstance(v, dict) else v
    return ml_collections.ConfigDict(cfg)
