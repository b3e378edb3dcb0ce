"""Hugging Face checkpoints <-> ftjax params: `config.json` and `*.safetensors`, per family.

`load_pretrained(dir)` reads a local transformers directory (single or sharded safetensors, any
of fp32/bf16/fp16) into `(ModelConfig, params)`, streaming tensor by tensor into preallocated,
layer-stacked host arrays, so peak host memory stays near one copy of the model.
`save_pretrained(dir, cfg, params)` writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads with no missing or unexpected keys.

Families (DESIGN.md §3): Llama, Mistral, Qwen2, Qwen3, Gemma, GPT-2 and Mixtral. Layout facts
(see shared/reference/hf-formats-and-losses.md §3): nn.Linear weights are [out, in] and ftjax
kernels [in, out]; GPT-2's Conv1D is already [in, out] and fuses q|k|v in `c_attn`; RoPE uses the
same rotate_half layout on both sides, so q/k rows need no permutation; Gemma norms are stored as
`w` and applied as (1 + w) on both sides (`norm_offset=1`), so they are copied unchanged.

Mixtral experts come in two file layouts, both read (checked against transformers 5.24):
"hub" (what `save_pretrained` of transformers 4 and 5 writes, and the Hub's checkpoints):
`block_sparse_moe.gate.weight` [E, d] and per expert `block_sparse_moe.experts.M.w1/w3/w2.weight`
(w1 = gate [f, d], w3 = up [f, d], w2 = down [d, f]); "fused" (transformers 5's in-memory
state dict): `mlp.gate.weight` [E, d], `mlp.experts.gate_up_proj` [E, 2f, d] (gate rows first,
then up) and `mlp.experts.down_proj` [E, d, f]. ftjax stacks them as `layers/moe/router/kernel`
[L, d, E] and `layers/moe/{gate,up,down}_proj/kernel` [L, E, in, out].

Modules, one job each: `families` (the per-family table both directions read), `config`
(config.json <-> ModelConfig), `layout` (HF tensor <-> ftjax leaf), `load`, `save`,
`tokenizer_files`.

Every problem with a checkpoint (unsupported config field, missing, unexpected or misshaped
tensor) is collected and raised as one `HFCheckpointError` before any tensor data is read.
"""
from ftjax.io.hf.config import (config_from_hf, config_to_hf, hf_problems, load_config,
                                model_config_from_section, read_config)
from ftjax.io.hf.families import (HF_FAMILIES, SUPPORTED_ARCHITECTURES, HFCheckpointError,
                                  HFFamily)
from ftjax.io.hf.layout import Entry, leaf_shapes, n_index, tensor_layout
from ftjax.io.hf.load import load_pretrained
from ftjax.io.hf.save import save_pretrained
from ftjax.io.hf.tokenizer_files import (TOKENIZER_FILES, copy_tokenizer_files,
                                         write_chat_template)

__all__ = ["HFCheckpointError", "SUPPORTED_ARCHITECTURES", "HF_FAMILIES", "HFFamily",
           "load_pretrained", "save_pretrained", "load_config", "read_config", "config_from_hf",
           "config_to_hf", "hf_problems", "tensor_layout", "Entry", "leaf_shapes", "n_index",
           "model_config_from_section", "copy_tokenizer_files", "TOKENIZER_FILES",
           "write_chat_template"]
