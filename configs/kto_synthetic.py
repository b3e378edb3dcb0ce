"""KTO (trainer "kto") of the quickstart base on unpaired synthetic feedback: each training
prompt once, with the correct answer (desirable) or a corrupted one (undesirable).

    python -m ftjax.main --config configs/kto_synthetic.py --workdir /tmp/kto
    python -m ftjax.main --config configs/kto_synthetic.py:peft=full ...   # reference precomputed
"""
import ml_collections

from configs import common
from configs.quickstart import SHIPPED_BASE, base_model, peft_section
from ftjax.trainers.kto import DEFAULTS


def get_config(arg=None):
    arg = common.parse_arg(arg, tasks="dmy2iso", steps=200, peft="lora", beta=0.1, lr=0.0,
                           loss="kto")
    c = common.base(trainer="kto")
    c.model = base_model()
    c.model.init_from = SHIPPED_BASE
    lr = arg.lr or (1e-4 if arg.peft == "full" else 2e-3)
    c.optimizer = common.optimizer("adamw", learning_rate=lr,
                                   warmup_steps=common.warmup(10, arg.steps), weight_decay=0.0)
    c.train = common.train(steps=arg.steps, batch_size=32, seq_len=48, log_every=10,
                           eval_every=50, checkpoint_every=0, keep_checkpoints=1)
    c.data = ml_collections.ConfigDict(dict(
        source="", tasks=tuple(arg.tasks.split("+")), n_per_task=2000, seed=0, test_frac=0.2,
        corruption="perturb", desirable_frac=0.5))
    c.kto = ml_collections.ConfigDict(dict(DEFAULTS["kto"], beta=arg.beta, loss_type=arg.loss))
    c.peft = peft_section(arg.peft, arg.steps)
    return c
