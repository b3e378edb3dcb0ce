"""`python -m ftjax.serve` (or `ftjax serve`): serve a model over the OpenAI API.

    python -m ftjax.serve --model /tmp/qs --port 8000
    python -m ftjax.serve --model HF_DIR --adapter math=ADAPTER_DIR --adapter chat=WORKDIR
    python -m ftjax.serve --model experiments/quickstart_base/model.safetensors --quant int8 \\
        --mesh tensor=8 --request-log /tmp/requests.jsonl --drift-reference prompts.jsonl

--model: an ftjax workdir (latest checkpoint, or --step), a Hugging Face directory, or an
ftjax params file (float or quantized). --adapter NAME=PATH (repeatable) loads a LoRA adapter
(a PEFT adapter directory or an ftjax LoRA workdir) as model `BASE:NAME`; more can be added
while serving (POST /v1/load_lora_adapter). docs/serving.md has the routes and settings.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_server", "parse_args"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ftjax.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="workdir, HF directory or params file")
    p.add_argument("--name", default=None, help="the base model's name (default: the "
                                                "checkpoint folder's or file's name)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory (params files)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="HF directories: parameter dtype")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a LoRA adapter served as BASE:NAME (repeatable)")
    p.add_argument("--max-adapters", type=int, default=None,
                   help="adapter slots (default: 8 with --adapter, else 0; >0 allows loading "
                        "adapters while serving)")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--quant", default="none", choices=("none", "int8", "nf4"),
                   help="weight-only quantization of the dense kernels")
    p.add_argument("--mesh", default="", help="e.g. tensor=8 or data=2,tensor=4: params "
                   "sharded tensor-parallel over heads and MLP on the first data x fsdp x "
                   "tensor devices (default: one device)")
    p.add_argument("--rule-overrides", default="",
                   help="with --mesh: sharding rule overrides, e.g. vocab=none (replicate the "
                        "embedding and LM head when the vocabulary does not divide the mesh)")
    p.add_argument("--slots", type=int, default=16, help="decode slots (concurrent requests)")
    p.add_argument("--max-len", type=int, default=512,
                   help="tokens per slot (prompt + completion); the KV cache holds "
                        "slots x max-len positions")
    p.add_argument("--chunk", type=int, default=4, help="decode steps per engine call")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--request-log", default=None, help="JSONL file, one line per request")
    p.add_argument("--log-prompts", action="store_true",
                   help="include prompt and completion text in the request log")
    p.add_argument("--drift-reference", default=None,
                   help="JSONL of reference prompts (field 'prompt' or 'messages'): enables "
                        "the drift check")
    p.add_argument("--drift-window", type=int, default=256)
    p.add_argument("--no-metrics", action="store_true", help="no /metrics endpoint")
    p.add_argument("--no-warmup", action="store_true",
                   help="compile the decode programs on first use instead of at start")
    return p.parse_args(argv)


def build_server(args: argparse.Namespace):
    """(Server, name): loads, quantizes and places the model, the adapters and monitoring."""
    from ftjax.evaluate import inference_layout, load_model
    from ftjax.serve.app import Server

    layout, devices = inference_layout(args.mesh, args.rule_overrides)
    model = load_model(args.model, step=args.step, tokenizer=args.tokenizer, layout=layout,
                       dtype=args.dtype, devices=devices)
    extra = {}
    if args.quant != "none":
        from ftjax.io.quantized import quantize_for_inference
        model.params = quantize_for_inference(model.params, kind=args.quant)
        extra["quant"] = args.quant
    name = args.name or _default_name(args.model)
    metrics = request_log = drift = None
    if not args.no_metrics:
        from ftjax.serve.metrics import ServerMetrics
        metrics = ServerMetrics(slots=args.slots)
    if args.request_log:
        from ftjax.serve.reqlog import RequestLog
        request_log = RequestLog(args.request_log, log_prompts=args.log_prompts)
    if args.drift_reference:
        from ftjax.serve.drift import DriftMonitor
        drift = DriftMonitor.from_jsonl(args.drift_reference, model.tokenizer,
                                        window=args.drift_window)
    max_adapters = args.max_adapters if args.max_adapters is not None else \
        (8 if args.adapter else 0)
    cache_sharding = _cache_sharding(model, layout) if args.mesh else None
    server = Server(model, name=name, slots=args.slots, max_len=args.max_len, chunk=args.chunk,
                    max_adapters=max_adapters, max_lora_rank=args.max_lora_rank,
                    metrics=metrics, request_log=request_log, drift=drift,
                    cache_sharding=cache_sharding, extra_version=extra,
                    warmup=not args.no_warmup)
    for spec in args.adapter:
        a_name, sep, path = spec.partition("=")
        if not sep:
            raise ValueError(f"--adapter {spec!r}: use NAME=PATH")
        server.registry.add_adapter(a_name, path)
    server.engine.set_params(server.registry.params)
    return server, name


def _cache_sharding(model, layout):
    """KV cache [layers, slots, len, kv_heads, head_dim]: kv heads over "tensor" when they
    divide it (as the attention weights are), else replicated."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = model.placement.mesh
    t = dict(zip(mesh.axis_names, mesh.devices.shape)).get("tensor", 1)
    spec = P(None, None, None, "tensor", None) if t > 1 and \
        model.cfg.num_kv_heads % t == 0 else P()
    return NamedSharding(mesh, spec)


def _default_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    return base.removesuffix(".safetensors").replace(":", "_") or "model"


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    try:
        server, name = build_server(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"ftjax.serve: error: {e}")
    import uvicorn

    from ftjax.serve.app import create_app
    print(f"[serve] {name}: {', '.join(m['id'] for m in server.registry.models())} on "
          f"http://{args.host}:{args.port}/v1 ({args.slots} slots x {args.max_len} tokens, "
          f"KV cache {server.engine.cache_bytes() / 2**20:.1f} MiB)", flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
