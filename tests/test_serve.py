"""The OpenAI-compatible server, through the official `openai` client on 127.0.0.1: models,
completions and chat equal to scripts/generate.py, streaming, two adapters in one batch,
concurrent requests, adapters loaded while serving, stop strings, n and seeds, errors (the
server keeps serving), versions, metrics and the request log."""
from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import time

import httpx
import numpy as np
import jax
import pytest

openai = pytest.importorskip("openai")

from ftjax.evaluate import load_model, mesh_sections  # noqa: E402
from ftjax.infer import generate as gen  # noqa: E402
from ftjax.io.peft_format import save_peft_adapter  # noqa: E402
from ftjax.peft.core import map_weights  # noqa: E402
from ftjax.peft.lora import LoRAWeight, apply_lora  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "experiments", "quickstart_base", "model.safetensors")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import generate as generate_script  # noqa: E402
from tests._serving import Running, free_port as _free_port  # noqa: E402

PROMPTS = ["add 12 34", "reverse hello", "sort 3 1 2", "format abc", "add 7 8",
           "reverse abcdef", "sort 9 2 5 1", "add 100 23"]


def _lora(params, seed: int):
    tree = apply_lora(params, jax.random.PRNGKey(seed), rank=4, alpha=8.0)
    key = jax.random.PRNGKey(100 + seed)

    def fill(path, w):
        if not isinstance(w, LoRAWeight):
            return w
        return w.replace(b=0.05 * jax.random.normal(
            jax.random.fold_in(key, sum(map(ord, path))), w.b.shape))
    return map_weights(fill, tree)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ftjax.serve.app import Server
    from ftjax.serve.metrics import ServerMetrics
    from ftjax.serve.reqlog import RequestLog
    tmp = tmp_path_factory.mktemp("serve")
    model = load_model(BASE, layout=mesh_sections(data=1), devices=jax.devices()[:1])
    adapters = {}
    for name, seed in (("a", 1), ("b", 2), ("late", 3)):
        tree = _lora(model.params, seed)
        save_peft_adapter(str(tmp / name), model.cfg, tree)
        adapters[name] = tree
    log_path = str(tmp / "requests.jsonl")
    server = Server(model, name="qs", slots=8, max_len=96, chunk=4, max_adapters=3,
                    max_lora_rank=8, metrics=ServerMetrics(slots=8),
                    request_log=RequestLog(log_path))
    server.registry.add_adapter("a", str(tmp / "a"))
    server.registry.add_adapter("b", str(tmp / "b"))
    server.engine.set_params(server.registry.params)
    running = Running(server)
    yield dict(run=running, client=running.client, model=model, adapters=adapters, tmp=tmp,
               log=log_path)
    running.close()


def _reference(params, model, prompts, new=24):
    return gen.generate_text(params, model.cfg, model.tokenizer, prompts, max_new_tokens=new)


def test_models_lists_base_and_adapters_with_versions(served):
    data = served["client"].models.list().data
    ids = [m.id for m in data]
    assert ids[0] == "qs" and {"qs:a", "qs:b"} <= set(ids)
    extra = {m.id: m.model_extra for m in data}
    assert extra["qs"]["version"]["kind"] == "params_file"
    assert extra["qs:a"]["version"]["kind"] == "peft"
    assert len(extra["qs:a"]["version"]["revision"]) == 16
    assert extra["qs:a"]["version"] != extra["qs:b"]["version"]


def test_completion_equals_generate_script(served):
    """Greedy output for a request equals scripts/generate.py's for the same prompt."""
    script = generate_script.main(["--model", BASE, "--max-new-tokens", "24"]
                                  + sum((["--prompt", p] for p in PROMPTS[:4]), []))
    for p, want in zip(PROMPTS[:4], script):
        r = served["client"].completions.create(model="qs", prompt=p, max_tokens=24,
                                                temperature=0)
        assert r.choices[0].text == want
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.prompt_tokens == 2 + len(p)           # bos + text + "\n"
        assert r.usage.completion_tokens == len(want) + 1    # + eos
        assert r.system_fingerprint.startswith("fp_")


def test_chat_equals_generate_script(served):
    script = generate_script.main(["--model", BASE, "--chat", "reverse hello",
                                   "--max-new-tokens", "24"])
    r = served["client"].chat.completions.create(
        model="qs", messages=[{"role": "user", "content": "reverse hello"}], temperature=0,
        max_tokens=24)
    assert r.choices[0].message.content == script[0]
    assert r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion"


def test_streaming_chunks_add_up_to_the_whole_answer(served):
    c = served["client"]
    whole = c.completions.create(model="qs", prompt="reverse abcdef", max_tokens=24,
                                 temperature=0).choices[0].text
    chunks = list(c.completions.create(model="qs", prompt="reverse abcdef", max_tokens=24,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole and len([ch for ch in chunks if ch.choices]) >= 3
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(whole) + 1
    chat = list(c.chat.completions.create(
        model="qs", messages=[{"role": "user", "content": "sort 3 1 2"}], temperature=0,
        max_tokens=24, stream=True))
    assert chat[0].choices[0].delta.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chat)
    cut = list(c.completions.create(model="qs", prompt="reverse abcdef", max_tokens=24,
                                    temperature=0, stream=True, stop=["cb"]))
    assert "".join(ch.choices[0].text for ch in cut if ch.choices) == whole[:whole.index("cb")]
    assert streamed == c.chat.completions.create(
        model="qs", messages=[{"role": "user", "content": "sort 3 1 2"}], temperature=0,
        max_tokens=24).choices[0].message.content


def test_two_adapters_in_one_batch(served):
    """Concurrent requests for the base, qs:a and qs:b: each equals its own model's output,
    and the engine ran rows of different adapters in the same decode call."""
    server, model = served["run"].server, served["model"]
    seen = []
    original = server.engine.on_step

    def spy(active, total, dt):
        seen.append(set(int(i) for i, on in zip(server.engine._adapter, server.engine._active)
                        if on))
        if original is not None:
            original(active, total, dt)
    server.engine.on_step = spy
    jobs = [(m, p) for p in PROMPTS[:4] for m in ("qs", "qs:a", "qs:b")]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as ex:
            got = list(ex.map(lambda j: served["client"].completions.create(
                model=j[0], prompt=j[1], max_tokens=24, temperature=0).choices[0].text, jobs))
    finally:
        server.engine.on_step = original
    refs = {"qs": _reference(model.params, model, PROMPTS[:4]),
            "qs:a": _reference(served["adapters"]["a"], model, PROMPTS[:4]),
            "qs:b": _reference(served["adapters"]["b"], model, PROMPTS[:4])}
    assert refs["qs:a"] != refs["qs"] and refs["qs:b"] != refs["qs:a"]
    for (m, p), text in zip(jobs, got):
        assert text == refs[m][PROMPTS.index(p)], (m, p)
    a, b = (server.registry.bank.index(n) for n in ("a", "b"))
    assert any({a, b} <= s for s in seen), seen


def test_concurrent_requests(served):
    want = _reference(served["model"].params, served["model"], PROMPTS)
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        got = list(ex.map(lambda i: served["client"].completions.create(
            model="qs", prompt=PROMPTS[i % 8], max_tokens=24, temperature=0).choices[0].text,
            range(32)))
    assert got == [want[i % 8] for i in range(32)]


def test_adapter_loaded_and_unloaded_while_serving(served):
    url, tmp = served["run"].url, served["tmp"]
    r = httpx.post(url + "/v1/load_lora_adapter",
                   json={"lora_name": "late", "lora_path": str(tmp / "late")})
    assert r.status_code == 200, r.text
    want = _reference(served["adapters"]["late"], served["model"], PROMPTS[:2])
    for p, w in zip(PROMPTS[:2], want):
        assert served["client"].completions.create(
            model="qs:late", prompt=p, max_tokens=24, temperature=0).choices[0].text == w
    r = httpx.post(url + "/v1/load_lora_adapter",
                   json={"lora_name": "again", "lora_path": str(tmp / "late")})
    assert r.status_code == 400 and "full" in r.json()["error"]["message"]
    assert httpx.post(url + "/v1/unload_lora_adapter",
                      json={"lora_name": "late"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        served["client"].completions.create(model="qs:late", prompt="add 1 2", max_tokens=4)
    r = httpx.post(url + "/v1/load_lora_adapter",
                   json={"lora_name": "x", "lora_path": str(tmp / "missing")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"


def test_sampling_n_seed_stop_and_max_tokens(served):
    c = served["client"]
    kw = dict(model="qs", prompt="tell me a story", max_tokens=12, temperature=2.0, seed=3)
    r1, r2 = c.completions.create(n=3, **kw), c.completions.create(n=3, **kw)
    texts = [ch.text for ch in r1.choices]
    assert texts == [ch.text for ch in r2.choices] and len(texts) == 3
    assert len(set(texts)) > 1                                  # choices differ
    assert [ch.index for ch in r1.choices] == [0, 1, 2]
    full = c.completions.create(model="qs", prompt="reverse abcdef", max_tokens=24,
                                temperature=0).choices[0].text
    cut = c.completions.create(model="qs", prompt="reverse abcdef", max_tokens=24,
                               temperature=0, stop=["c"])
    assert cut.choices[0].text == full[:full.index("c")]
    assert cut.choices[0].finish_reason == "stop"
    short = c.completions.create(model="qs", prompt="reverse abcdef", max_tokens=2,
                                 temperature=0)
    assert short.choices[0].text == full[:2] and short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 2


def test_errors_have_the_openai_shape_and_the_server_survives(served):
    c, url = served["client"], served["run"].url
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="qs", prompt="a" * 200, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="qs", prompt="x", temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="qs", messages=[{"role": "robot", "content": "x"}])
    r = httpx.post(url + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert httpx.get(url + "/v1/nothing").json()["error"]["code"] == "not_found"
    ok = c.completions.create(model="qs", prompt="add 1 2", max_tokens=8, temperature=0)
    assert ok.choices[0].text


def test_metrics_and_request_log(served):
    from prometheus_client.parser import text_string_to_metric_families
    c, url = served["client"], served["run"].url
    c.completions.create(model="qs", prompt="add 2 2", max_tokens=8, temperature=0)
    text = httpx.get(url + "/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    total = sum(s.value for f in fams.values() for s in f.samples
                if s.name.endswith("requests_total") and s.labels.get("model") == "qs")
    assert total >= 1
    tokens = sum(s.value for f in fams.values() for s in f.samples
                 if "completion_tokens" in s.name and s.name.endswith("_total"))
    assert tokens >= 1
    errors = sum(s.value for f in fams.values() for s in f.samples
                 if s.name.endswith("errors_total"))
    assert errors >= 1                                   # from the error test (module order)
    lines = [json.loads(x) for x in open(served["log"])]
    assert lines and all("prompt" not in x or x["prompt"] is None for x in lines)
    last = lines[-1]
    assert last["model"] == "qs" and last["completion_tokens"] >= 1
    assert last["version"]["base"]["kind"] == "params_file"


def test_command_line_server_sharded_quantized_with_drift_alert(tmp_path):
    """`python -m ftjax.serve` as users start it: int8 weights, a 2-way tensor-parallel mesh,
    a request log and a drift reference. Answers equal in-process int8 generation; a shifted
    stream of prompts raises the drift alert line and metric, in-distribution prompts do not."""
    import subprocess

    from ftjax.io.quantized import quantize_for_inference
    rng = np.random.default_rng(0)

    def in_dist(k):
        a, b = rng.integers(0, 99, 2)
        return [f"add {a} {b}", f"reverse {''.join(rng.choice(list('abcdefgh'), 6))}",
                f"sort {' '.join(map(str, rng.integers(0, 9, 4)))}"][k % 3]
    ref = tmp_path / "reference.jsonl"
    ref.write_text("".join(json.dumps({"prompt": in_dist(k)}) + "\n" for k in range(300)))
    port, log = _free_port(), tmp_path / "requests.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftjax.serve", "--model", BASE, "--name", "qs", "--port",
         str(port), "--quant", "int8", "--mesh", "tensor=2", "--rule-overrides", "vocab=none", "--slots", "8", "--max-len", "64",
         "--request-log", str(log), "--drift-reference", str(ref), "--drift-window", "64"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() - t0 < 180, "the server did not start"
            time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        model = load_model(BASE, layout=mesh_sections(data=1), devices=jax.devices()[:1])
        q = quantize_for_inference(model.params, kind="int8")
        want = gen.generate_text(q, model.cfg, model.tokenizer, PROMPTS[:3], max_new_tokens=16)
        for p, w in zip(PROMPTS[:3], want):
            assert client.completions.create(model="qs", prompt=p, max_tokens=16,
                                             temperature=0).choices[0].text == w
        assert client.models.list().data[0].model_extra["version"]["quant"] == "int8"

        def drift_alert():
            fams = httpx.get(url + "/metrics").text
            return [line for line in fams.splitlines()
                    if line.startswith("ftjax_drift_alert{") and line.endswith(" 1.0")]
        for k in range(64):
            client.completions.create(model="qs", prompt=in_dist(k), max_tokens=1)
        assert drift_alert() == []
        for k in range(64):
            shifted = "".join(rng.choice(list("XYZ#@!QW"), 30))
            client.completions.create(model="qs", prompt=shifted, max_tokens=1)
        assert drift_alert()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "DRIFT ALERT" in err
    lines = [json.loads(x) for x in open(log)]
    assert len(lines) == 3 + 128 and all("prompt" not in x for x in lines)


def test_a_hugging_face_directory_is_served_like_generate_script(tmp_path):
    """An HF directory (weights, tokenizer.json, chat template) served: completions and chat
    equal scripts/generate.py on the same directory."""
    from ftjax.serve.app import Server
    from ftjax.train.export import save_model
    model = load_model(BASE, layout=mesh_sections(data=1), devices=jax.devices()[:1])
    hf_dir = str(tmp_path / "hf")
    save_model(hf_dir, model.cfg, model.params, model.tokenizer, model.template)
    served = load_model(hf_dir, layout=mesh_sections(data=1), devices=jax.devices()[:1])
    assert served.source["kind"] == "hf"
    running = Running(Server(served, name="hf", slots=4, max_len=64))
    try:
        script = generate_script.main(["--model", hf_dir, "--max-new-tokens", "16",
                                       "--prompt", "reverse hello"])
        r = running.client.completions.create(model="hf", prompt="reverse hello",
                                              max_tokens=16, temperature=0)
        assert r.choices[0].text == script[0]
        chat = generate_script.main(["--model", hf_dir, "--max-new-tokens", "16",
                                     "--chat", "sort 3 1 2"])
        r = running.client.chat.completions.create(
            model="hf", messages=[{"role": "user", "content": "sort 3 1 2"}], max_tokens=16,
            temperature=0)
        assert r.choices[0].message.content == chat[0]
    finally:
        running.close()
