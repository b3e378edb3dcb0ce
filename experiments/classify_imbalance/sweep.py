"""Plain vs class-weighted cross-entropy vs focal loss vs oversampling on an imbalanced
classification file (`words.csv`, made by `make_data.py`: 60% reverse, 24% sort, 10% swap,
6% caesar).

`configs/classify_file.py` trains a 0.1M-parameter char model from scratch for 800 steps per
(loss, seed), learning rate 1e-3 for every variant (none is tuned); scored on the stratified
validation split (500 examples). `docs/data_imbalance.md` discusses the table.

    python -m ftjax.sweep run experiments/classify_imbalance --procs 2
"""
import ml_collections

MINORITY = ("swap", "caesar")


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "classify_imbalance"
    c.base = ("configs/classify_file.py:path=csv:experiments/classify_imbalance/words.csv,"
              "steps=800")
    c.overrides = ("train.progress=False", "train.tensorboard=False",
                   "train.eval_every=200", "train.checkpoint_every=0")
    v = "metrics.validation"
    c.metrics = (("accuracy", f"{v}.accuracy"), ("macro_f1", f"{v}.macro_f1"),
                 ("macro_recall", f"{v}.macro_recall"), ("macro_pr_auc", f"{v}.macro_pr_auc"),
                 *[(f"{k}_{cls}", f"{v}.per_class.{cls}.{k}")
                   for cls in MINORITY for k in ("recall", "f1")],
                 ("recall_reverse", f"{v}.per_class.reverse.recall"),
                 ("wall_s", "record.wall_s"))
    c.analysis = dict(
        title="Imbalanced classification: CE vs weighted CE vs focal vs oversampling",
        description=("Validation split (500 examples: 300 reverse, 120 sort, 50 swap, 30 "
                     "caesar) after 800 steps of batch 32; class weights are inverse "
                     "frequency, focal gamma 2. 2 seeds per variant."),
        columns=("label.loss",),
        fmt={"wall_s": ".0f", **{k: ".3f" for k in (
            "accuracy", "macro_f1", "macro_recall", "macro_pr_auc", "recall_swap", "f1_swap",
            "recall_caesar", "f1_caesar", "recall_reverse")}},
        plots=(dict(axis="label.loss", metric="macro_f1", file="macro_f1.png"),),
        curves=dict(split="classify", key="loss"),
    )
    return c


def get_sweep(h):
    return h.product([
        h.variants("loss", {
            "ce": {"arg.loss": "ce"},
            "weighted": {"arg.loss": "weighted", "arg.weights": "inverse"},
            "focal": {"arg.loss": "focal", "arg.gamma": 2.0},
            "focal_alpha": {"arg.loss": "focal", "arg.gamma": 2.0,
                            "arg.focal_alpha": "class_weights"},
            "oversample": {"arg.loss": "ce", "arg.sampling": "oversample"},
        }),
        h.seeds([0, 1])])
