"""IA3 fine-tuning of the quickstart base on the unseen task `dmy2iso`: learned rescaling of
keys, values and MLP activations (`base=False`: over a random model).

    python -m ftjax.main --config configs/ia3_sft.py --workdir workdirs/ia3

Defaults (ftjax/peft/ia3.py, PEFT's Llama defaults): scale the outputs of k_proj and v_proj
and the input of down_proj, initialised to ones (L·(2·kv_size + intermediate) parameters).
IA3 trains few numbers and wants a larger learning rate than LoRA.
"""
from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.peft import method_defaults


def get_config(arg=None):
    arg = common.parse_arg(arg, base=True, tasks="dmy2iso", steps=400,
                           learning_rate=5e-2)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps,
                                   init="base" if arg.base else "scratch"))
    c.peft = method_defaults("ia3")  # every IA3 setting, documented in ftjax/peft/ia3.py
    c.optimizer.learning_rate = arg.learning_rate
    return c
