"""The resolved experiment config (what config.json records and the hash covers): PEFT and
trainer defaults filled in from their one declaration, any trainer takes any PEFT method from
the command line, and misspelled keys are refused by name."""
import pytest

from ftjax import config_utils, peft
from ftjax.trainers import resolve_config

SAMPLE = "experiments/data_samples/instruction.jsonl"


def _resolve(spec, *overrides):
    return resolve_config(config_utils.load_config(spec),
                          [tuple(o.split("=", 1)) for o in overrides])


def test_peft_defaults_are_recorded_and_switchable_on_the_command_line():
    c = _resolve("configs/sft_file.py", "peft.method=lora", "peft.rank=4")
    assert c.peft.method == "lora" and c.peft.rank == 4
    assert c.peft.alpha == peft.method_defaults("lora").alpha  # the default is in the config
    plain = _resolve("configs/sft_file.py")
    assert dict(plain.peft) == dict(peft.method_defaults("full"))
    assert config_utils.config_hash(c) != config_utils.config_hash(plain)


def test_typed_peft_argument_on_a_file_run():
    c = _resolve(f"configs/sft_file.py:path={SAMPLE},peft=lora")
    assert c.peft.method == "lora" and c.data.source.endswith("instruction.jsonl")
    assert set(peft.method_defaults("lora")) <= set(c.peft)


def test_synthetic_sft_configs_take_a_data_file():
    c = _resolve("configs/lora_sft.py", f"data.source=jsonl:{SAMPLE}", "data.field_map=")
    assert c.data.source == f"jsonl:{SAMPLE}" and c.peft.method == "lora"


def test_trainer_sections_get_their_declared_defaults():
    from ftjax.trainers.classify import DEFAULTS
    c = _resolve("configs/classify_file.py", "classify.gamma=3")
    assert c.classify.gamma == 3.0
    assert set(c.classify) == set(DEFAULTS["classify"])
    d = _resolve("configs/dpo_file.py")
    from ftjax.trainers.dpo import DEFAULTS as DPO
    assert set(d.dpo) == set(DPO["dpo"])


@pytest.mark.parametrize("override,named", [
    ("peft.rnak=4", "peft.rnak (did you mean rank?)"),
    ("dpo.betta=0.2", "dpo.betta"),
])
def test_misspelled_keys_are_refused_by_name(override, named):
    spec = "configs/dpo_file.py" if override.startswith("dpo") else "configs/lora_sft.py"
    with pytest.raises(ValueError) as e:
        _resolve(spec, override)
    assert named in str(e.value) or override.split("=")[0] in str(e.value)


def test_a_misspelled_trainer_section_key_in_a_file_is_refused():
    cfg = config_utils.load_config("configs/classify_file.py")
    cfg.classify.gama = 2.0
    with pytest.raises(ValueError,
                       match=r"unknown config key .classify.gama.*did you mean .classify.gamma"):
        resolve_config(cfg)


def test_a_run_from_a_hf_checkpoint_uses_its_tokenizers_template():
    assert _resolve("configs/sft_file.py").data.template == "plain"
    assert _resolve("configs/sft_file.py", "model.init_from=hf:/some/dir").data.template == ""
    told = _resolve("configs/sft_file.py:template=chatml", "model.init_from=hf:/some/dir")
    assert told.data.template == "chatml"
    assert _resolve("configs/dpo_file.py", "model.init_from=hf:/x").data.template == ""
