"""The PEFT codec registry (ftjax.io.peft_format.registry) and the HF family table
(ftjax.io.hf.families): how a weight type finds its codec, and that the table agrees with the
ModelConfig presets. Parity with peft/transformers is in test_peft_format*.py and test_hf_io.py."""
import dataclasses
import filecmp

import flax.struct
import jax
import numpy as np
import pytest

from ftjax.io import hf
from ftjax.io import peft_format as pf
from ftjax.models import transformer
from ftjax.models.config import FAMILIES, ModelConfig, preset
from ftjax.peft import core
from ftjax.peft.lora import LoRAWeight, apply_lora
from ftjax.peft.lora_fa import LoRAFAWeight, apply_lora_fa
from ftjax.peft.vera import apply_vera

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
             num_kv_heads=2)
QV = (r"layers/attn/(q|v)_proj/kernel",)


@pytest.fixture(scope="module")
def llama():
    cfg = preset("llama", **SMALL)
    return cfg, transformer.init(cfg, jax.random.PRNGKey(0))


def _nonzero_b(params):
    def one(_, w):
        if not core.is_structured(w):
            return w
        return dataclasses.replace(w, b=w.b + 0.05 * jax.random.normal(
            jax.random.PRNGKey(int(w.b.size)), w.b.shape, w.b.dtype))
    return core.map_weights(one, params)


def test_protocol_weight_is_written_as_lora(llama, tmp_path):
    """LoRA-FA is no LoRAWeight subclass: its lora_factors() alone makes it PEFT LoRA, with the
    same files as the LoRAWeight holding the same factors, read back as LoRAWeight."""
    cfg, base = llama
    assert not issubclass(LoRAFAWeight, LoRAWeight)
    fa = _nonzero_b(apply_lora_fa(base, jax.random.PRNGKey(1), rank=4, alpha=8.0, targets=QV))
    as_lora = core.map_weights(
        lambda _, w: LoRAWeight(base=w.base, a=w.a, b=w.b, scale=w.scale)
        if isinstance(w, LoRAFAWeight) else w, fa)
    pf.save_peft_adapter(tmp_path / "fa", cfg, fa)
    pf.save_peft_adapter(tmp_path / "lora", cfg, as_lora)
    for name in (pf.CONFIG_NAME, pf.WEIGHTS_NAME):
        assert filecmp.cmp(tmp_path / "fa" / name, tmp_path / "lora" / name, shallow=False)
    back = pf.load_peft_adapter(tmp_path / "fa", cfg, base)
    w = back["layers"]["attn"]["q_proj"]["kernel"]
    assert type(w) is LoRAWeight
    np.testing.assert_array_equal(np.asarray(w.b), np.asarray(
        fa["layers"]["attn"]["q_proj"]["kernel"].b))


def test_codec_lookup_walks_the_mro():
    @flax.struct.dataclass
    class MyLoRA(LoRAWeight):
        pass

    w = MyLoRA(base=np.zeros((4, 3)), a=np.zeros((4, 2)), b=np.zeros((2, 3)), scale=1.0)
    assert pf.codec_for(w) is pf.codec_for(LoRAWeight(base=w.base, a=w.a, b=w.b))
    assert pf.codec_for(w).peft_type == "LORA"


def test_registered_codec_for_a_new_type(llama, tmp_path):
    """A new class registers its codec in one line and is then written by that format."""
    @flax.struct.dataclass
    class Scaled(core.StructuredWeight):  # a LoRA stored with its scale folded into b
        base: object
        a: jax.Array
        bs: jax.Array

        def matmul(self, x):
            return core.linear(x, self.base) + x @ self.a @ self.bs

        def materialize(self):
            return core.materialize(self.base) + self.a @ self.bs

    cfg, base = llama
    lora = _nonzero_b(apply_lora(base, jax.random.PRNGKey(1), rank=4, alpha=4.0, targets=QV))
    scaled = core.map_weights(lambda _, w: Scaled(base=w.base, a=w.a, bs=w.b * w.scale)
                              if core.is_structured(w) else w, lora)
    with pytest.raises(pf.PeftFormatError, match="Scaled, which has no PEFT form"):
        pf.save_peft_adapter(tmp_path / "x", cfg, scaled)
    pf.register_codec(Scaled, pf.Codec(
        "LORA", "lora", lambda w: dict(base=w.base, a=w.a, b=w.bs, scale=1.0)))
    pf.save_peft_adapter(tmp_path / "scaled", cfg, scaled)
    pf.save_peft_adapter(tmp_path / "lora", cfg, lora)
    back = pf.load_peft_adapter(tmp_path / "scaled", cfg, base)
    for p, w in core.map_weights(lambda p, w: w, lora)["layers"]["attn"].items():
        if p in ("q_proj", "v_proj"):
            got = back["layers"]["attn"][p]["kernel"]
            np.testing.assert_allclose(np.asarray(core.materialize(got)),
                                       np.asarray(core.materialize(w["kernel"])), atol=1e-6)


def test_weight_without_codec_is_refused_by_name(llama, tmp_path):
    cfg, base = llama
    vera = apply_vera(base, jax.random.PRNGKey(1), rank=4, targets=QV)
    with pytest.raises(pf.PeftFormatError) as e:
        pf.save_peft_adapter(tmp_path / "v", cfg, vera)
    msg = str(e.value)
    assert "VeRAWeight, which has no PEFT form" in msg
    assert "LoRAWeight" in msg and "IA3Weight" in msg and "lora_factors()" in msg


# --------------------------------------------------------------------------------------------
# The family table


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_table_reads_the_presets(family):
    """Every preset family has one table entry; the fields its transformers class hard-wires
    are the preset's, so a preset config writes and reads back unchanged."""
    fam = hf.HF_FAMILIES[family]
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for field, value in fam.fixed_fields.items():
        assert value == FAMILIES[family].get(field, defaults[field]), field
    kw = dict(SMALL, num_kv_heads=4) if family == "gpt2" else SMALL
    cfg = preset(family, **kw)
    assert hf.hf_problems(cfg) == []
    c = hf.config_to_hf(cfg)
    assert c["architectures"] == [fam.architecture] and c["model_type"] == fam.model_type
    for field, key in fam.keys.items():
        if not (fam.moe and field == "intermediate_size"):
            assert c[key] == getattr(cfg, field), (field, key)
    assert hf.config_from_hf(c) == cfg
    keys = [e.key for e in hf.tensor_layout(cfg)]  # covers every leaf (asserted inside)
    assert keys[0] == fam.prefix + fam.head[0][0]
    assert (keys[-1] == "lm_head.weight") == (not cfg.tie_embeddings)


def test_fixed_field_mismatch_names_the_field():
    cfg = preset("qwen3", **SMALL).replace(qk_norm=False)
    assert hf.hf_problems(cfg) == ["qk_norm=False: Qwen3ForCausalLM requires True"]
    with pytest.raises(hf.HFCheckpointError, match="qk_norm=False"):
        hf.config_to_hf(cfg)
