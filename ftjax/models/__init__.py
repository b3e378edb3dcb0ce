"""Model definitions: `ModelConfig` plus pure `init` / `apply` / `param_axes`."""
from ftjax.models.config import FAMILIES, SIZES, ModelConfig, preset
from ftjax.models.transformer import (apply, count_params, init, init_cache, param_axes,
                                      param_shapes, param_specs, unstack_layers)
