"""Mixture of Agents (ftjax/infer/moa.py): the composed prompt, who sees what in which order,
the majority vote, config errors, LocalAgent == generate_text, OpenAIAgent against an in-thread
ftjax server == LocalAgent (greedy), and scripts/moa.py end to end."""
from __future__ import annotations

import os
import sys

import jax
import pytest

from ftjax.config_utils import load_config
from tests._serving import Running
from ftjax.infer import generate as gen
from ftjax.infer.moa import (DEFAULT_TEMPLATE, Agent, LocalAgent, MoA, OpenAIAgent, VoteAgent,
                             check_config, compose, from_config, majority)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "experiments", "quickstart_base", "model.safetensors")
PROMPTS = ["add 12 34", "reverse hello", "sort 3 1 2", "format abc", "reverse abcdef"]


# ---- compose ------------------------------------------------------------------------------


def test_compose_is_the_documented_text():
    t = "Q: {prompt}\nAnswers:\n{responses}\nEnd {x} {{prompt}}"
    got = compose(t, "what is {responses}?", ["  first \n", "second\nline", ""])
    # One pass: braces inside the prompt are not substituted again; other braces are literal;
    # responses are stripped, numbered from 1, one per line, no trailing newline.
    assert got == ("Q: what is {responses}?\nAnswers:\n1. first\n2. second\nline\n3. \n"
                   "End {x} {what is {responses}?}")


def test_compose_default_template():
    got = compose(DEFAULT_TEMPLATE, "dmy2iso 18/05/1971", ["1971-05-18", "1971-18-05"])
    head = DEFAULT_TEMPLATE.split("{responses}")[0]
    assert got == (head + "1. 1971-05-18\n2. 1971-18-05\n\nUser query: dmy2iso 18/05/1971")
    assert got.startswith("You have been provided with a set of responses")


@pytest.mark.parametrize("template", ["{prompt} only", "{responses} only", "neither", 3])
def test_compose_needs_both_placeholders(template):
    with pytest.raises(ValueError, match="template"):
        compose(template, "p", ["r"])


# ---- the pipeline with stub agents ---------------------------------------------------------


class Stub:
    """Records every batch it receives; answers `name(prompt length)`."""

    def __init__(self, name):
        self.name, self.calls = name, []

    def complete(self, prompts, *, max_tokens, temperature):
        self.calls.append(dict(prompts=list(prompts), max_tokens=max_tokens,
                               temperature=temperature))
        return [f"{self.name}[{len(p)}]" for p in prompts]


def test_stub_is_an_agent():
    assert isinstance(Stub("a"), Agent) and isinstance(VoteAgent(), Agent)


def test_two_layers_see_x1_then_composed_prompts_in_order():
    a, b, c, d, agg = Stub("a"), Stub("b"), Stub("c"), Stub("d"), Stub("agg")
    t = "P={prompt}|R={responses}"
    moa = MoA([[a, b, c], [d]], agg, t, max_tokens=7, temperature=0.5)
    x1 = ["one", "two two", "three!"]
    res = moa.run(x1)
    for s in (a, b, c):  # layer 1: the user prompts, the whole batch in one call
        assert s.calls == [dict(prompts=x1, max_tokens=7, temperature=0.5)]
    layer1 = [[f"{n}[{len(p)}]" for p in x1] for n in "abc"]
    want2 = [compose(t, p, [layer1[0][i], layer1[1][i], layer1[2][i]])
             for i, p in enumerate(x1)]
    assert want2[0] == "P=one|R=1. a[3]\n2. b[3]\n3. c[3]"
    assert d.calls == [dict(prompts=want2, max_tokens=7, temperature=0.5)]
    want_agg = [compose(t, p, [f"d[{len(q)}]"]) for p, q in zip(x1, want2)]
    assert agg.calls == [dict(prompts=want_agg, max_tokens=7, temperature=0.5)]
    assert res.answers == [f"agg[{len(q)}]" for q in want_agg]
    assert res.inputs == [x1, want2] and res.aggregator_inputs == want_agg
    assert res.responses[0] == layer1 and res.names == [["a", "b", "c"], ["d"]]
    # run() overrides
    moa.run(["x"], max_tokens=3, temperature=0.0)
    assert a.calls[-1] == dict(prompts=["x"], max_tokens=3, temperature=0.0)


def test_vote_aggregator_and_majority():
    assert majority(["x", " y", "y ", "x", "z"]) == "x"      # tie 2-2 -> first seen
    assert majority(["b", "a", "a"]) == "a" and majority(["q"]) == "q" and majority([]) == ""

    class Fixed:
        def __init__(self, name, outs):
            self.name, self.outs = name, outs

        def complete(self, prompts, *, max_tokens, temperature):
            return list(self.outs[:len(prompts)])
    agents = [Fixed("a", ["1", "u", "k"]), Fixed("b", ["2", "v", "k"]), Fixed("c", ["2", "w", "m"])]
    res = MoA([agents], VoteAgent()).run(["p", "q", "r"])
    assert res.answers == ["2", "u", "k"]
    # A VoteAgent in a later layer votes too; in layer 1 it has nothing to vote on.
    res = MoA([agents, [VoteAgent("v1")]], VoteAgent()).run(["p", "q", "r"])
    assert res.responses[1] == [["2", "u", "k"]] and res.answers == ["2", "u", "k"]
    with pytest.raises(ValueError, match="layer 1"):
        MoA([[VoteAgent()]], VoteAgent())
    with pytest.raises(TypeError, match="votes"):
        VoteAgent().complete(["p"], max_tokens=1, temperature=0.0)


def test_bad_pipelines():
    with pytest.raises(ValueError, match="at least one layer"):
        MoA([], Stub("a"))
    with pytest.raises(ValueError, match="layer 2 is empty"):
        MoA([[Stub("a")], []], Stub("b"))
    with pytest.raises(ValueError, match="not an agent"):
        MoA([["a"]], Stub("b"))

    class Short(Stub):
        def complete(self, prompts, **kw):
            return []
    with pytest.raises(RuntimeError, match="answered 0 of 2"):
        MoA([[Short("s")]], Stub("b")).run(["p", "q"])


# ---- config ----------------------------------------------------------------------------------


def _config(**over):
    c = load_config("experiments/moa/config.py:models=a+b,layers=2")
    for k, v in over.items():
        c[k] = v
    return c


def test_config_builds_agents_once():
    c = _config()
    c.agents.remote = dict(kind="openai", base_url="http://127.0.0.1:1/v1", model="qs",
                           chat=True)
    c.layers = [["m0", "m1", "remote"], ["m1"]]
    loaded = []
    moa = from_config(c, lambda name, spec: loaded.append((name, spec.path)) or Stub(name))
    assert loaded == [("m0", "a"), ("m1", "b")]
    assert moa.layers[0][1] is moa.layers[1][0]
    remote = moa.layers[0][2]
    assert isinstance(remote, OpenAIAgent) and remote.chat and remote.model == "qs"
    assert isinstance(moa.aggregator, VoteAgent) and moa.template == DEFAULT_TEMPLATE
    assert moa.max_tokens == 32


@pytest.mark.parametrize("change, message", [
    (dict(layers=[["m0", "nope"]]), "layer 1 names unknown agent 'nope'"),
    (dict(layers=[["m0"], []]), "layer 2 is empty"),
    (dict(layers=[]), "no layers"),
    (dict(layers=["m0"]), "layer 1 is 'm0'"),
    (dict(aggregator="judge"), "aggregator 'judge' is not a defined agent"),
    (dict(template="{prompt} alone"), r"lacks \{responses\}"),
])
def test_bad_configs_say_what_is_wrong(change, message):
    with pytest.raises(ValueError, match=message):
        check_config(_config(**change))


def test_bad_agent_specs():
    c = _config()
    c.agents.m0.kind = "hf"
    with pytest.raises(ValueError, match="unknown kind 'hf'"):
        check_config(c)
    c = _config()
    c.agents.m0.path = ""
    with pytest.raises(ValueError, match="needs a model `path`"):
        check_config(c)
    c = _config()
    c.agents.r = dict(kind="openai", model="x")
    with pytest.raises(ValueError, match="base_url"):
        check_config(c)
    with pytest.raises(ValueError, match="load_ftjax"):
        from_config(_config())


# ---- real models -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base():
    from ftjax.evaluate import load_model, mesh_sections
    return load_model(BASE, layout=mesh_sections(data=1), devices=jax.devices()[:1])


def test_local_agent_answers_like_generate_text(base):
    agent = LocalAgent(base.params, base.cfg, base.tokenizer, "base")
    got = agent.complete(PROMPTS, max_tokens=16, temperature=0.0)
    assert got == gen.generate_text(base.params, base.cfg, base.tokenizer, PROMPTS,
                                    max_new_tokens=16)
    assert got[1] == "olleh"  # the base reverses
    sampled = agent.complete(PROMPTS, max_tokens=16, temperature=1.0)
    assert len(sampled) == len(PROMPTS) and all(isinstance(s, str) for s in sampled)


def test_openai_agent_against_the_ftjax_server_equals_local(base):
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from ftjax.serve.app import Server
    running = Running(Server(base, name="qs", slots=8, max_len=96, chunk=4))
    try:
        local = LocalAgent(base.params, base.cfg, base.tokenizer, "local")
        want = local.complete(PROMPTS, max_tokens=16, temperature=0.0)
        remote = OpenAIAgent(running.url + "/v1", "qs")
        assert remote.name == "qs"
        assert remote.complete(PROMPTS, max_tokens=16, temperature=0.0) == want
        # chat: the model's template ("plain": [bos] text "\n") gives the same prompts
        chat = OpenAIAgent(running.url + "/v1", "qs", name="qs-chat", chat=True)
        assert chat.complete(PROMPTS[:2], max_tokens=16, temperature=0.0) == want[:2]
        # a mixture of the two, voted
        res = MoA([[local, remote, chat]], VoteAgent()).run(PROMPTS[:2], max_tokens=16)
        assert res.answers == want[:2]
    finally:
        running.close()


def test_script_end_to_end(capsys):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import moa as moa_script
    finally:
        sys.path.pop(0)
    res = moa_script.main(["--config", f"experiments/moa/config.py:models={BASE}+{BASE},max_tokens=16",
                           "--prompt", "reverse hello", "--prompt", "reverse abc", "--json"])
    assert res.answers == ["olleh", "cba"] and res.names == [["m0", "m1"]]
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and '"answer": "olleh"' in lines[0]
    report = moa_script.main(["--config", f"experiments/moa/config.py:models={BASE},max_tokens=16",
                              "--eval-task", "reverse", "--eval-n", "8"])
    assert report["n"] == 8 and report["moa"] == report["agents"]["m0"]
