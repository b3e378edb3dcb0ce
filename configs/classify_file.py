"""Sequence classification on a file of {text, label} records (trainer "classify").

    python -m ftjax.main --config configs/classify_file.py --workdir /tmp/cls
    python -m ftjax.main --config configs/classify_file.py:loss=focal,gamma=2 ...
    python -m ftjax.main --config configs/classify_file.py:path=my.jsonl,peft=lora ...

Typed arguments: path (csv/jsonl/json/parquet, kind from the extension, or "kind:PATH"),
loss = ce | weighted | focal, weights = inverse | sqrt_inverse | effective_number (class
weights of "weighted", and of focal's alpha with focal_alpha=class_weights), gamma (focal),
peft = full | lora | ... (the method's own peft section), sampling = none | oversample |
undersample | stratified (train split only), steps. The default data is the shipped sample
`experiments/data_samples/classification.csv` (four payload kinds, imbalanced 50/25/15/10).
The head reads the last token of each example (`ftjax/trainers/classify.py`, `ftjax/train/classify_head.py`); results, per-class
metrics and the confusion matrix go to <workdir>/summary.json, the data report beside it.
"""
import ml_collections

from configs import common

SAMPLING = ("none", "oversample", "undersample", "stratified")


def get_config(arg=None):
    arg = common.parse_arg(arg, path="experiments/data_samples/classification.csv",
                           loss="ce", weights="inverse", gamma=2.0, focal_alpha="none",
                           peft="full", sampling="none", steps=300, seed=0)
    if arg.sampling not in SAMPLING:
        raise ValueError(f"sampling={arg.sampling!r}; choose one of {SAMPLING}")
    c = common.base(trainer="classify", seed=arg.seed)
    c.model = common.model("llama", vocab_size=99, hidden_size=64, intermediate_size=176,
                           num_layers=2, num_heads=4, num_kv_heads=2,
                           max_position_embeddings=64)
    c.optimizer = common.optimizer("adamw", learning_rate=1e-3,
                                   warmup_steps=common.warmup(20, arg.steps),
                                   weight_decay=0.01)
    c.train = common.train(steps=arg.steps, batch_size=32, seq_len=48, log_every=25,
                           eval_every=100, checkpoint_every=100, keep_checkpoints=1)
    c.data = common.data_file(
        source=arg.path, format="classification", packing="none",  # one example per row
        max_len=0,                   # 0: train.seq_len tokens per example (bos text eos)
        imbalance=dict(oversample="balanced" if arg.sampling == "oversample" else "",
                       undersample="balanced" if arg.sampling == "undersample" else "",
                       stratify_batches=arg.sampling == "stratified"),
        min_train_examples=1000)
    c.classify = ml_collections.ConfigDict(dict(
        loss=arg.loss,               # ce | weighted | focal
        class_weights=arg.weights,   # inverse | sqrt_inverse | effective_number
        beta=0.999,                  # effective_number: (1 - beta) / (1 - beta^n_c)
        gamma=arg.gamma,             # focal: (1 - p_t)^gamma
        focal_alpha=arg.focal_alpha,  # focal: none | class_weights (alpha_t = w[y])
    ))
    if arg.peft != "full":
        from configs.quickstart import peft_section
        c.peft = peft_section(arg.peft, arg.steps)
        # the head trains anyway; for adapters the backbone stays frozen
    return c
