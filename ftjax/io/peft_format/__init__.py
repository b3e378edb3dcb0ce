"""PEFT adapter directories <-> ftjax params with adapter leaves.

`save_peft_adapter(dir, cfg, params)` writes `adapter_config.json` + `adapter_model.safetensors`
that `peft.PeftModel.from_pretrained(hf_model, dir)` loads onto the transformers model
`ftjax.io.hf.save_pretrained` writes for `cfg`; `load_peft_adapter(dir, cfg, base_params)` reads
such a directory (written by PEFT or by ftjax) back into params with `LoRAWeight` leaves
(`DoRAWeight` for `use_dora`, `IA3Weight` for peft_type IA3). See docs/peft_format.md and
shared/reference/hf-formats-and-losses.md §2.

Modules, one job each: `registry` (which codec writes each kind of structured weight;
`register_codec`), `codecs` (the built-in registrations), `modules` (the transformers
modules an adapter can sit on, PEFT's selection rules), `factors` (LoRA factors in PEFT's
layout), `lora_write` / `lora_read` and `ia3` (the LORA and IA3 formats), `save` / `load`
(the two entry points), `files` (names, errors, file IO), `residual` (PiSSA conversion).

Layout facts (PEFT 0.21, checked against its source and by saving tiny models):
- a key is `base_model.model.<transformers module path>.<adapter tensor>`; the module path is
  the key of the module's weight in the checkpoint (`ftjax.io.hf.tensor_layout`, which this
  package reuses) without `.weight`, e.g. `model.layers.3.self_attn.q_proj`.
- Linear (and GPT-2 Conv1D) LoRA: `lora_A.weight` [r, in], `lora_B.weight` [out, r]; the
  update is `s * B @ A` on the [out, in] weight. ftjax's `a` [in, r] / `b` [r, out] are A.T and
  B.T, with the layer index as the leading axis of stacked leaves.
- Embedding LoRA: `lora_embedding_A` [r, vocab], `lora_embedding_B` [embed, r] (no `.weight`);
  the table update is `s * (B @ A).T` [vocab, embed], so again a = A.T, b = B.T.
- Scale s = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`; r and alpha per
  module from `rank_pattern` / `alpha_pattern` (first key k with
  `re.match(rf"(.*\\.)?({k})$", module)`).
- GPT-2's fused `c_attn` (q|k|v on the output axis) holds one LoRA for three ftjax leaves:
  written as A = [A_q; A_k; A_v] (ranks concatenated) and block-diagonal B, which is the same
  update; read by sharing A and splitting B's rows.
- DoRA: `lora_magnitude_vector` [out] (no `.weight`) holds m itself, the norms of W + sBA per
  output unit (dim 1 of [out, in]), = DoRAWeight.m (norms over `in` of the [in, out] kernel).
- IA3: `ia3_l` [out, 1] scales a module's output, [1, in] (modules in `feedforward_modules`)
  its input; = IA3Weight.ia3_l [.., out] / [.., in].

- Mixture-of-experts weights (Mixtral) are raw parameters in transformers 5, adapted through
  `target_parameters` (PEFT's `ParamWrapper`): for `mlp.experts.gate_up_proj` [E, 2f, d],
  `mlp.experts.down_proj` [E, d, f] and the router's `mlp.gate.weight` [E, d], `lora_A.weight`
  is [E*r, in] (expert-major rows: row e*r + j is A_e[j]) and `lora_B.weight` [out, r*E]
  (expert-minor columns: column j*E + e is B_e[:, j]); expert e's update is s * B_e @ A_e on its
  [out, in] slice. Several targeted parameters of one module nest wrappers in the module's
  parameter order (gate_up_proj inside down_proj), so the inner one's keys gain `.base_layer`
  (`mlp.experts.base_layer.lora_A.weight` for gate_up_proj when down_proj is targeted too).
  rank/alpha patterns match the parameter path (`mlp.experts.gate_up_proj`).
- The fused gate|up tensor has one A per expert shared by its two halves, while ftjax's gate
  and up adapters are independent: ftjax writes rank r_gate + r_up with A_e = [A_gate; A_up]
  and block-diagonal B_e (the same update), and reading splits B's rows; when B is block
  structured (every rank column feeds one half only) each half keeps just its own columns, so
  such adapters read back with their original factors. Transformers-4 era adapters on the
  per-expert `block_sparse_moe.experts.M.w1/w2/w3` (and `block_sparse_moe.gate`) Linear modules
  are read too.
"""
from ftjax.io.peft_format import codecs  # noqa: F401  (registers the built-in codecs and formats)
from ftjax.io.peft_format.files import (CONFIG_NAME, WEIGHTS_NAME, PeftFormatError,
                                        read_adapter_config)
from ftjax.io.peft_format.load import load_peft_adapter
from ftjax.io.peft_format.modules import module_table, param_table
from ftjax.io.peft_format.registry import (Codec, Format, codec_for, register_codec,
                                           register_format)
from ftjax.io.peft_format.residual import residual_to_standard
from ftjax.io.peft_format.save import save_peft_adapter

__all__ = ["PeftFormatError", "save_peft_adapter", "load_peft_adapter", "read_adapter_config",
           "module_table", "param_table", "residual_to_standard", "CONFIG_NAME", "WEIGHTS_NAME",
           "Codec", "Format", "register_codec", "register_format", "codec_for"]
