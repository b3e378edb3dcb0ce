"""Distillation (trainer "distill") of the shipped quickstart base into a student half its depth.

    python -m ftjax.main --config configs/distill.py --workdir /tmp/kd
    python -m ftjax.main --config configs/distill.py:alpha=0 --workdir /tmp/ce    # CE baseline
    python -m ftjax.main --config configs/distill.py:loss=jsd,beta=0.5,temperature=2 ...
    python -m ftjax.main --config configs/distill.py:init=scratch,tasks=reverse+sort ...

Teacher: `experiments/quickstart_base/model.safetensors` (4 layers, 0.76M params, pretrained on
the synthetic suite). Student: the same architecture with 2 layers (`layers`), started from the
teacher's first and last layers (`init=truncate`) or at random (`init=scratch`). The student
trains on the pretraining tasks (`tasks`) with `alpha` * divergence + (1 - alpha) * CE; alpha=0
is the plain-CE baseline on the same data and steps. Summary: teacher and student held-out
exact match (docs/distillation.md).
"""
import ml_collections

from configs import common
from configs.quickstart import SHIPPED_BASE, base_model
from ftjax.trainers.distill import DEFAULTS


def get_config(arg=None):
    arg = common.parse_arg(arg, tasks="add+reverse+sort+format", steps=300, alpha=0.5,
                           loss="forward_kl", beta=0.5, temperature=1.0, layers=2,
                           init="truncate", teacher_completions=False, eval_examples=200)
    c = common.base(trainer="distill")
    c.model = base_model()
    c.model.num_layers = arg.layers
    c.optimizer = common.optimizer("adamw", learning_rate=1e-3,
                                   warmup_steps=common.warmup(20, arg.steps),
                                   weight_decay=0.01)
    c.train = common.train(steps=arg.steps, batch_size=32, seq_len=48, log_every=25,
                           eval_every=100, checkpoint_every=100, keep_checkpoints=1)
    c.data = ml_collections.ConfigDict(dict(
        tasks=tuple(arg.tasks.split("+")), n_per_task=2000, seed=0, test_frac=0.2,
        eval_examples=arg.eval_examples, max_new_tokens=16, eval_before=True))
    c.distill = ml_collections.ConfigDict(dict(
        DEFAULTS["distill"], teacher=SHIPPED_BASE, loss=arg.loss, beta=arg.beta,
        temperature=arg.temperature, alpha=arg.alpha,
        student_init="truncate" if arg.init == "truncate" else "config",
        teacher_completions=arg.teacher_completions))
    return c
