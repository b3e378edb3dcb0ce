"""Load test of the OpenAI-compatible server against transformers' `generate`, on loopback.

    python scripts/load_test.py                      # 1, 8 and 32 clients, both targets
    python scripts/load_test.py --clients 32 --target ftjax --requests 128
    python scripts/load_test.py --soak 600 --clients 32 --target ftjax   # RSS before/after

Both targets serve the same model: `tiny` (llama, 4 layers, hidden 256, vocab 8192; random
weights with a fixed seed, so every request generates exactly --max-tokens tokens) behind
the same OpenAI `/v1/completions` route, each in its own subprocess:
  ftjax     `python -m ftjax.serve` (continuous batching, --slots decode slots);
  hf        the same weights exported to a Hugging Face directory, loaded by transformers
            (CPU torch, float32), answering one request at a time with `model.generate`
            (greedy) behind a lock: the baseline.
Each client sends its next request as soon as the previous one is answered (closed loop)
until --requests are done or --max-seconds pass. Per (target, clients): requests/s, p50 /
p99 latency, generated tokens/s (from the usage counts), printed as one JSON object. Nothing
leaves 127.0.0.1; the servers are stopped at the end.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PROMPTS = ["add 12 34", "reverse hello world", "sort 3 1 2 9", "format 2021-03-04",
           "the quick brown fox", "count 1 2 3", "copy abcdefgh", "upper hello"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(out: str, seed: int = 0) -> tuple[str, str]:
    """(params file, HF directory) of the `tiny` llama with random weights."""
    import jax

    from ftjax import models
    from ftjax.io.hf import save_pretrained
    from ftjax.io.params_file import save_params
    cfg = models.preset("llama", "tiny", init_std=0.02)
    params = models.init(cfg, jax.random.PRNGKey(seed))
    pfile, hf_dir = os.path.join(out, "tiny.safetensors"), os.path.join(out, "tiny_hf")
    save_params(pfile, cfg, params)
    save_pretrained(hf_dir, cfg, params)
    return pfile, hf_dir


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------
# The baseline server: transformers generate, one request at a time
# ------------------------------------------------------------------------------------------

def serve_hf(hf_dir: str, port: int, threads: int) -> None:
    import threading

    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from transformers import AutoModelForCausalLM

    from ftjax.data.batching import bos_prefix
    from ftjax.data.tokenizer import CharTokenizer
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = CharTokenizer()
    lock = threading.Lock()
    app = FastAPI()

    def run(prompt: str, max_tokens: int) -> tuple[str, int, int]:
        ids = bos_prefix(tok) + list(tok.encode(prompt + "\n"))
        with lock, torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0,
                                 min_new_tokens=max_tokens)
        new = out[0, len(ids):].tolist()
        return tok.decode([t for t in new if t < tok.vocab_size]), len(ids), len(new)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        loop = asyncio.get_running_loop()
        text, n_in, n_out = await loop.run_in_executor(
            None, run, body["prompt"], int(body.get("max_tokens", 16)))
        return {"object": "text_completion", "model": body["model"],
                "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                          "total_tokens": n_in + n_out}}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ------------------------------------------------------------------------------------------
# Driving the load
# ------------------------------------------------------------------------------------------

def start_server(target: str, pfile: str, hf_dir: str, args) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if target == "ftjax":
        cmd = [sys.executable, "-m", "ftjax.serve", "--model", pfile, "--name", "tiny",
               "--port", str(port), "--slots", str(args.slots), "--max-len",
               str(args.max_len), "--chunk", str(args.chunk)]
    else:
        cmd = [sys.executable, __file__, "--serve-hf", hf_dir, "--port", str(port),
               "--torch-threads", str(args.torch_threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{target} server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.time() - t0 > 300:
            proc.kill()
            raise RuntimeError(f"{target} server did not start in 300 s")
        time.sleep(0.5)


async def drive(url: str, clients: int, requests: int, max_seconds: float, max_tokens: int
                ) -> dict:
    import httpx
    latencies, tokens, errors = [], [], 0
    done = 0
    t_end = time.perf_counter() + max_seconds

    async def client(k: int, http: httpx.AsyncClient):
        nonlocal done, errors
        i = k
        while done < requests and time.perf_counter() < t_end:
            done += 1
            body = {"model": "tiny", "prompt": PROMPTS[i % len(PROMPTS)],
                    "max_tokens": max_tokens, "temperature": 0}
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/completions", json=body)
            if r.status_code != 200:
                errors += 1
            else:
                latencies.append(time.perf_counter() - t0)
                tokens.append(r.json()["usage"]["completion_tokens"])
            i += clients

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k, http) for k in range(clients)))
        wall = time.perf_counter() - t0
    import numpy as np
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {"clients": clients, "requests": len(latencies), "errors": errors,
            "wall_s": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 3),
            "tokens_per_s": round(sum(tokens) / wall, 1),
            "p50_latency_s": round(float(np.percentile(lat, 50)), 3),
            "p99_latency_s": round(float(np.percentile(lat, 99)), 3)}


def warm(url: str, max_tokens: int, n: int = 3) -> None:
    """First requests compile (ftjax) or warm caches (torch); not measured."""
    asyncio.run(drive(url, min(n, 3), n, 600, max_tokens))


def main(argv: Optional[list] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="both", choices=("both", "ftjax", "hf"))
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per measurement (default: 4 x clients, at least 8)")
    p.add_argument("--max-seconds", type=float, default=120)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--soak", type=float, default=0,
                   help="seconds of load at the largest client count, with the server's "
                        "RSS before and after (ftjax target)")
    p.add_argument("--serve-hf", default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_hf:
        serve_hf(args.serve_hf, args.port, args.torch_threads)
        return {}
    clients = [int(c) for c in args.clients.split(",")]
    targets = ["ftjax", "hf"] if args.target == "both" else [args.target]
    result: dict = {"model": "tiny (llama, 4 layers, hidden 256, vocab 8192)",
                    "max_tokens": args.max_tokens, "slots": args.slots, "chunk": args.chunk,
                    "cpu_count": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        pfile, hf_dir = make_model(tmp)
        for target in targets:
            proc, url = start_server(target, pfile, hf_dir, args)
            try:
                warm(url, args.max_tokens)
                for c in clients:
                    n = args.requests or max(4 * c, 8)
                    row = asyncio.run(drive(url, c, n, args.max_seconds, args.max_tokens))
                    row["target"] = target
                    result["runs"].append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                if args.soak and target == "ftjax":
                    before = rss_mb(proc.pid)
                    row = asyncio.run(drive(url, max(clients), 10 ** 9, args.soak,
                                            args.max_tokens))
                    row.update(target=target, soak=True, rss_before_mb=round(before, 1),
                               rss_after_mb=round(rss_mb(proc.pid), 1))
                    result["runs"].append(row)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    by = {(r["target"], r["clients"]): r for r in result["runs"] if not r.get("soak")}
    result["speedup_tokens_per_s"] = {
        str(c): round(by[("ftjax", c)]["tokens_per_s"] / by[("hf", c)]["tokens_per_s"], 2)
        for c in clients if ("ftjax", c) in by and ("hf", c) in by
        and by[("hf", c)]["tokens_per_s"] > 0}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
