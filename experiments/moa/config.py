"""Mixture of Agents (ftjax/infer/moa.py, docs/moa.md): which agents, in which layers, and who
aggregates.

    python scripts/moa.py --config experiments/moa/config.py --prompt "dmy2iso 18/05/1971"
    python scripts/moa.py --config experiments/moa/config.py:models=a.safetensors+workdirs/l1+workdirs/l2 \\
        --prompt "dmy2iso 18/05/1971"
    python scripts/moa.py --config experiments/moa/config.py:aggregator=m0,layers=2 --prompt ...

Fields:
  agents      name -> spec. kind "ftjax": `path` (workdir, HF directory or params file, loaded
              by `ftjax.evaluate.load_model`), optional `template` (HF tokenizers' chat
              template; default the model's own). kind "openai": `base_url` (the API root
              with /v1), `model`, optional `chat` (bool) and `api_key`. kind "vote": the
              majority-vote aggregator (no model; the degenerate, non-LLM MoA).
  layers      list of layers, each a non-empty list of agent names (layer 1 first).
  aggregator  the agent name that gives the final answer.
  template    the aggregate-and-synthesize prompt with {prompt} and {responses}
              (`ftjax.infer.moa.compose`; default `DEFAULT_TEMPLATE`).
  max_tokens, temperature: every agent's generation settings.

Typed arguments: `models` (paths joined by `+`; agents m0, m1, ...), `layers` (how many
layers of those same agents), `aggregator` ("vote" or an agent name), `max_tokens`.
An OpenAI-compatible endpoint is added by hand, e.g.
`c.agents.remote = dict(kind="openai", base_url="http://127.0.0.1:8000/v1", model="qs")`.
"""
import ml_collections

from configs import common
from ftjax.infer.moa import DEFAULT_TEMPLATE

BASE = "experiments/quickstart_base/model.safetensors"


def get_config(arg=None):
    arg = common.parse_arg(arg, models=BASE, layers=1, aggregator="vote", max_tokens=32)
    c = ml_collections.ConfigDict()
    names = []
    agents = {}
    for i, path in enumerate(p for p in arg.models.split("+") if p):
        name = f"m{i}"
        names.append(name)
        agents[name] = dict(kind="ftjax", path=path, template="")
    agents["vote"] = dict(kind="vote")
    c.agents = agents
    c.layers = [list(names) for _ in range(arg.layers)]
    c.aggregator = arg.aggregator
    c.template = DEFAULT_TEMPLATE
    c.max_tokens = arg.max_tokens
    c.temperature = 0.0
    return c
