"""Mixture of Agents (Wang et al. 2024; survey §6.7): layers of proposers and an aggregator.

    y_1 = x_1                                    (the user prompt)
    y_i = ⊕_j A_ij(y_{i-1}-responses) + x_1      (i > 1)

Layer 1's agents answer the user prompt x_1 itself. Every later layer's agents, and the final
aggregator, answer the aggregate-and-synthesize prompt

    compose(template, x_1, previous layer's responses)

which substitutes, in ONE pass over `template` (so braces inside the prompt or the responses are
never substituted again):

* `{prompt}`    -> x_1, as given;
* `{responses}` -> the previous layer's responses, one per line, in the layer's agent order,
  numbered from 1: `"1. " + r_1.strip() + "\\n" + "2. " + r_2.strip() + ...` (no trailing
  newline; a response's inner newlines are kept as they are).

Nothing else in the template is touched (other braces are literal); both placeholders must occur.
`DEFAULT_TEMPLATE` is the paper's aggregate-and-synthesize instruction followed by the user query.

An agent is anything with a `name` and `complete(prompts, *, max_tokens, temperature) ->
list[str]` (`Agent`): an in-process ftjax model (`LocalAgent`), any OpenAI-compatible endpoint
(`OpenAIAgent`, e.g. `python -m ftjax.serve`), or a test stub. An agent that also has
`aggregate(prompts, responses, *, max_tokens, temperature)` (`VoteAgent`) is given x_1 and the
previous layer's raw responses instead of the composed text: `VoteAgent` returns the majority
response. It is the degenerate, non-LLM aggregator; it exists so the pipeline can be measured
with ftjax's character-level models, which were never trained to read a synthesis prompt.

`from_config` builds an `MoA` from a config (experiments/moa/config.py); loading ftjax models is left to
the caller (scripts/moa.py does it with `ftjax.evaluate.load_model`), since `infer` sits below
`evaluate`.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, runtime_checkable

__all__ = ["Agent", "DEFAULT_TEMPLATE", "LocalAgent", "MoA", "MoAResult", "OpenAIAgent",
           "VoteAgent", "compose", "format_responses", "from_config", "majority"]

DEFAULT_TEMPLATE = (
    "You have been provided with a set of responses from various models to the latest user "
    "query. Your task is to synthesize these responses into a single, high-quality response. "
    "It is crucial to critically evaluate the information provided in these responses, "
    "recognizing that some of it may be biased or incorrect. Your response should not simply "
    "replicate the given answers but should offer a refined, accurate, and comprehensive reply "
    "to the instruction. Ensure your response is well-structured, coherent, and adheres to the "
    "highest standards of accuracy and reliability.\n"
    "\n"
    "Responses from models:\n"
    "{responses}\n"
    "\n"
    "User query: {prompt}"
)

_PLACEHOLDER = re.compile(r"\{(prompt|responses)\}")


@runtime_checkable
class Agent(Protocol):
    """One model of the mixture: answers a batch of prompts, one completion each, in order."""

    name: str

    def complete(self, prompts: list[str], *, max_tokens: int,
                 temperature: float) -> list[str]: ...


def check_template(template: str) -> None:
    """ValueError unless `template` contains both `{prompt}` and `{responses}`."""
    if not isinstance(template, str):
        raise ValueError(f"the MoA template must be a string, got {type(template).__name__}")
    found = set(_PLACEHOLDER.findall(template))
    missing = [f"{{{k}}}" for k in ("prompt", "responses") if k not in found]
    if missing:
        raise ValueError(f"the MoA template lacks {' and '.join(missing)}; it must contain "
                         "both {prompt} (the user prompt) and {responses} (the numbered "
                         "responses of the previous layer)")


def format_responses(responses: Sequence[str]) -> str:
    """`"1. r1\\n2. r2..."`: each response stripped of outer whitespace, numbered from 1."""
    return "\n".join(f"{i}. {str(r).strip()}" for i, r in enumerate(responses, 1))


def compose(template: str, prompt: str, responses: Sequence[str]) -> str:
    """The aggregate-and-synthesize prompt: `template` with `{prompt}` -> `prompt` and
    `{responses}` -> `format_responses(responses)`, substituted in one pass (see module doc)."""
    check_template(template)
    values = {"prompt": prompt, "responses": format_responses(responses)}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def majority(responses: Sequence[str]) -> str:
    """The most common response (compared after stripping outer whitespace); ties go to the
    one that occurs first. Empty input gives ""."""
    cleaned = [str(r).strip() for r in responses]
    if not cleaned:
        return ""
    counts = collections.Counter(cleaned)
    best = max(counts.values())
    return next(r for r in cleaned if counts[r] == best)


# ---------------------------------------------------------------------------------------------
# Agents


class VoteAgent:
    """Majority vote over the previous layer's responses: a non-LLM aggregator (ties -> the
    first agent's answer). The degenerate MoA: no synthesis, only agreement. It takes the raw
    responses (`aggregate`), so it cannot sit in layer 1, which has none."""

    def __init__(self, name: str = "vote"):
        self.name = name

    def aggregate(self, prompts: list[str], responses: list[list[str]], *, max_tokens: int = 0,
                  temperature: float = 0.0) -> list[str]:
        """`responses[i]`: prompt i's answers, one per agent of the previous layer."""
        del prompts, max_tokens, temperature
        return [majority(r) for r in responses]

    def complete(self, prompts: list[str], *, max_tokens: int, temperature: float) -> list[str]:
        raise TypeError(f"VoteAgent {self.name!r} votes over the previous layer's responses "
                        "(MoA calls its `aggregate`); it cannot answer a prompt")


def _is_hf(tokenizer: Any) -> bool:
    from ftjax.data.hf_tokenizer import HFTokenizer
    return isinstance(tokenizer, HFTokenizer)


class LocalAgent:
    """An in-process ftjax model. With the character tokenizer (ftjax's synthetic models) each
    prompt is encoded in the synthetic-suite layout `[bos] prompt "\\n"` (`generate_text`, as
    `scripts/generate.py --prompt` does); with an HF tokenizer it is the user message of a
    conversation rendered by `template` (default: the tokenizer's own chat template) with the
    generation prompt (`apply_chat_template` + `generate_ids`, as `--chat` does).

    Sampling (temperature > 0) draws from PRNGKey(seed) folded with the call number, so
    repeated calls differ and a fresh agent repeats them. apply_fn: as `generate`'s (prompt
    or prefix tuning)."""

    def __init__(self, params: Any, cfg: Any, tokenizer: Any, name: str,
                 template: Optional[str] = None, *, seed: int = 0, batch_size: int = 64,
                 apply_fn: Any = None):
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.name, self.template, self.seed = name, template, seed
        self.batch_size, self.apply_fn = batch_size, apply_fn
        self._calls = 0

    def _sampling(self, temperature: float) -> dict:
        out: dict = dict(temperature=float(temperature))
        if self.apply_fn is not None:
            out["apply_fn"] = self.apply_fn
        if temperature > 0:
            import jax
            out["rng"] = jax.random.fold_in(jax.random.PRNGKey(self.seed), self._calls)
        self._calls += 1
        return out

    def complete(self, prompts: list[str], *, max_tokens: int, temperature: float) -> list[str]:
        from ftjax.infer.generate import generate_ids, generate_text
        prompts = list(prompts)
        if not prompts:
            return []
        sampling = self._sampling(temperature)
        if not _is_hf(self.tokenizer):
            return generate_text(self.params, self.cfg, self.tokenizer, prompts,
                                 max_new_tokens=max_tokens, batch_size=self.batch_size,
                                 **sampling)
        from ftjax.data.chat import apply_chat_template
        encoded = [list(apply_chat_template(self.tokenizer, [{"role": "user", "content": p}],
                                            add_generation_prompt=True,
                                            template=self.template)) for p in prompts]
        ids = generate_ids(self.params, self.cfg, self.tokenizer, encoded,
                           max_new_tokens=max_tokens, batch_size=self.batch_size, **sampling)
        return [self.tokenizer.decode(i) for i in ids]  # decode stops at any of eos_ids


class OpenAIAgent:
    """A model behind an OpenAI-compatible API. `base_url` is the API root (with `/v1`, e.g.
    `http://127.0.0.1:8000/v1` for `python -m ftjax.serve`). chat=False sends the whole batch as
    one /completions request with a list of prompts (the server renders each as its
    `scripts/generate.py --prompt` does); chat=True sends one /chat/completions request per
    prompt, the prompt as the user message. Uses the `openai` client, imported on first use."""

    def __init__(self, base_url: str, model: str, name: Optional[str] = None,
                 api_key: str = "unused", chat: bool = False, *, timeout: float = 600.0,
                 seed: Optional[int] = None):
        self.base_url, self.model, self.name = base_url, model, name or model
        self.api_key, self.chat, self.timeout, self.seed = api_key, chat, timeout, seed
        self._client = None

    @property
    def client(self):
        if self._client is None:
            try:
                import openai
            except ImportError as e:  # pragma: no cover - openai is a declared extra
                raise ImportError("OpenAIAgent needs the `openai` client: pip install openai"
                                  ) from e
            self._client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key,
                                         timeout=self.timeout, max_retries=0)
        return self._client

    def complete(self, prompts: list[str], *, max_tokens: int, temperature: float) -> list[str]:
        prompts = list(prompts)
        if not prompts:
            return []
        extra = {} if self.seed is None else {"seed": self.seed}
        if self.chat:
            out = []
            for p in prompts:
                r = self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": p}],
                    max_tokens=max_tokens, temperature=temperature, **extra)
                out.append(r.choices[0].message.content or "")
            return out
        r = self.client.completions.create(model=self.model, prompt=prompts,
                                           max_tokens=max_tokens, temperature=temperature,
                                           **extra)
        choices = sorted(r.choices, key=lambda c: c.index)
        if len(choices) != len(prompts):
            raise RuntimeError(f"{self.name}: {len(prompts)} prompts got {len(choices)} "
                               "completions from the server")
        return [c.text for c in choices]


# ---------------------------------------------------------------------------------------------
# The mixture


@dataclasses.dataclass
class MoAResult:
    """answers[i]: the aggregator's answer to prompt i.
    inputs[l][i]: what layer l's agents saw for prompt i (layer 0: the prompt itself).
    responses[l][j][i]: agent j of layer l on prompt i; names[l][j] its name.
    aggregator_inputs[i]: the composed prompt the aggregator saw (a voting aggregator gets the
    last layer's responses instead, but this is still recorded for inspection)."""
    prompts: list[str]
    answers: list[str]
    inputs: list[list[str]]
    responses: list[list[list[str]]]
    names: list[list[str]]
    aggregator_inputs: list[str]


def _check_agent(agent: Any, where: str) -> None:
    if not callable(getattr(agent, "complete", None)) or not hasattr(agent, "name"):
        raise ValueError(f"{where} is {agent!r}, not an agent (needs `name` and `complete`)")


class MoA:
    """layers: lists of agents (layer 1 first); aggregator: the agent that gives the answer."""

    def __init__(self, layers: Sequence[Sequence[Agent]], aggregator: Agent,
                 template: str = DEFAULT_TEMPLATE, *, max_tokens: int = 64,
                 temperature: float = 0.0):
        if not layers:
            raise ValueError("MoA needs at least one layer of proposer agents")
        for i, layer in enumerate(layers, 1):
            if not layer:
                raise ValueError(f"MoA layer {i} is empty; every layer needs at least one agent")
            for j, agent in enumerate(layer, 1):
                _check_agent(agent, f"agent {j} of layer {i}")
        if any(hasattr(a, "aggregate") for a in layers[0]):
            raise ValueError("layer 1 answers the user prompt itself; an aggregating agent "
                             "(e.g. VoteAgent) has no responses to vote on there")
        _check_agent(aggregator, "the aggregator")
        check_template(template)
        self.layers = [list(layer) for layer in layers]
        self.aggregator, self.template = aggregator, template
        self.max_tokens, self.temperature = max_tokens, temperature

    def _ask(self, agent: Any, x1: list[str], composed: Optional[list[str]],
             previous: Optional[list[list[str]]], **kw) -> list[str]:
        if previous is not None and hasattr(agent, "aggregate"):
            out = agent.aggregate(list(x1), [list(r) for r in previous], **kw)
        else:
            out = agent.complete(list(x1 if composed is None else composed), **kw)
        out = list(out)
        if len(out) != len(x1):
            raise RuntimeError(f"agent {agent.name!r} answered {len(out)} of {len(x1)} prompts")
        return [str(o) for o in out]

    def run(self, prompts: Sequence[str], *, max_tokens: Optional[int] = None,
            temperature: Optional[float] = None) -> MoAResult:
        """Runs every layer on the whole batch, then the aggregator."""
        x1 = [str(p) for p in prompts]
        kw = dict(max_tokens=self.max_tokens if max_tokens is None else max_tokens,
                  temperature=self.temperature if temperature is None else temperature)
        inputs, responses = [], []
        composed: Optional[list[str]] = None
        previous: Optional[list[list[str]]] = None   # previous[i]: prompt i's answers
        for layer in self.layers:
            inputs.append(list(x1 if composed is None else composed))
            answers = [self._ask(a, x1, composed, previous, **kw) for a in layer]
            responses.append(answers)
            previous = [list(col) for col in zip(*answers)] if x1 else []
            composed = [compose(self.template, p, r) for p, r in zip(x1, previous)]
        final = self._ask(self.aggregator, x1, composed, previous, **kw)
        names = [[a.name for a in layer] for layer in self.layers]
        return MoAResult(prompts=x1, answers=final, inputs=inputs, responses=responses,
                         names=names, aggregator_inputs=list(composed or []))


# ---------------------------------------------------------------------------------------------
# Config


def _get(spec: Any, key: str, default: Any = None) -> Any:
    if isinstance(spec, Mapping):
        return spec.get(key, default)
    return getattr(spec, key, default) if hasattr(spec, key) else default


def check_config(config: Any) -> None:
    """ValueError naming the first problem of an MoA config (see experiments/moa/config.py)."""
    agents = _get(config, "agents") or {}
    if not agents:
        raise ValueError("the MoA config defines no agents (config.agents)")
    for name, spec in dict(agents).items():
        kind = _get(spec, "kind")
        if kind == "ftjax":
            if not _get(spec, "path"):
                raise ValueError(f"agent {name!r} (kind 'ftjax') needs a model `path`")
        elif kind == "openai":
            if not _get(spec, "base_url") or not _get(spec, "model"):
                raise ValueError(f"agent {name!r} (kind 'openai') needs `base_url` and `model`")
        elif kind != "vote":
            raise ValueError(f"agent {name!r} has unknown kind {kind!r}; use 'ftjax', 'openai' "
                             "or 'vote'")
    layers = list(_get(config, "layers") or [])
    if not layers:
        raise ValueError("the MoA config has no layers (config.layers: lists of agent names)")
    for i, layer in enumerate(layers, 1):
        if isinstance(layer, str) or not list(layer):
            raise ValueError(f"MoA layer {i} is {'empty' if not layer else repr(layer)}; "
                             "every layer is a non-empty list of agent names")
        for n in layer:
            if n not in agents:
                raise ValueError(f"layer {i} names unknown agent {n!r}; defined agents: "
                                 f"{sorted(agents)}")
    agg = _get(config, "aggregator")
    if agg not in agents:
        raise ValueError(f"aggregator {agg!r} is not a defined agent; defined agents: "
                         f"{sorted(agents)}")
    check_template(_get(config, "template", DEFAULT_TEMPLATE) or DEFAULT_TEMPLATE)


def from_config(config: Any, load_ftjax: Optional[Callable[[str, Any], Agent]] = None) -> MoA:
    """The MoA a config describes. `load_ftjax(name, spec)` builds the agent of a kind-'ftjax'
    spec (scripts/moa.py: `ftjax.evaluate.load_model` + `LocalAgent`); each agent is built once,
    even when it serves in several layers."""
    check_config(config)
    specs = dict(_get(config, "agents"))
    built: dict[str, Agent] = {}

    def agent(name: str) -> Agent:
        if name not in built:
            spec = specs[name]
            kind = _get(spec, "kind")
            if kind == "vote":
                built[name] = VoteAgent(name)
            elif kind == "openai":
                built[name] = OpenAIAgent(_get(spec, "base_url"), _get(spec, "model"), name=name,
                                          api_key=_get(spec, "api_key") or "unused",
                                          chat=bool(_get(spec, "chat", False)))
            else:
                if load_ftjax is None:
                    raise ValueError(f"agent {name!r} is an ftjax model; pass `load_ftjax` "
                                     "(scripts/moa.py loads it with ftjax.evaluate.load_model)")
                built[name] = load_ftjax(name, spec)
        return built[name]

    layers = [[agent(n) for n in layer] for layer in _get(config, "layers")]
    return MoA(layers, agent(_get(config, "aggregator")),
               _get(config, "template", DEFAULT_TEMPLATE) or DEFAULT_TEMPLATE,
               max_tokens=int(_get(config, "max_tokens", 64) or 64),
               temperature=float(_get(config, "temperature", 0.0) or 0.0))
