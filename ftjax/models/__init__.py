"""Model definitions: `ModelConfig` plus pure `init` / `apply` / `param_axes`."""
from ftjax.models.config import FAMILIES, SIZES, ModelConfig, preset
from ftjax.models.transformer import (apply, count_params, init, init_cache, logits_from_hidden,
                                      param_axes, param_shapes, param_specs, unstack_layers)
