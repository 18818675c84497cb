"""`llama2 serve`: the OpenAI-compatible server and web chat page for a checkpoint."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models) and a web chat page",
        description="Serve a checkpoint over an OpenAI-compatible HTTP API, with a web chat page at /. "
        "Concurrent requests are batched together in the model. Stop with Ctrl-C or SIGTERM.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face or Meta format)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; use 0.0.0.0 with --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("LLAMA2_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $LLAMA2_API_KEY, else no key)")
    p.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: directory name)")
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="most sequences decoded together; each row reserves a full-context KV cache (default 16)")
    p.add_argument("--prefix-cache-tokens", type=int, default=None,
                   help="keys and values of finished requests kept, in tokens, so that a conversation's next "
                   "request prefills only its new messages; each token costs 2 x layers x kv-heads x head-dim "
                   "values (default: twice the model's context; 0 turns it off)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype (default: float32 on CPU, the checkpoint's dtype on GPU)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from llama2.generation.llama import Llama
    from llama2.serving.server import create_app
    from llama2.stages.artifacts import model_dir

    if args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    if args.prefix_cache_tokens is not None and args.prefix_cache_tokens < 0:
        raise ValueError(f"--prefix-cache-tokens must be 0 or more, got {args.prefix_cache_tokens}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    llm = Llama.load(model_dir(args.model), device=device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    name = args.model_name or Path(args.model).resolve().name
    app = create_app(llm, name, api_key=args.api_key, max_batch_size=args.max_batch_size,
                     prefix_cache_tokens=args.prefix_cache_tokens)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key; anyone who can reach it can use it",
              file=sys.stderr)
    print(f"serving {name} ({llm.args.n_layers} layers, context {llm.args.max_seq_len}) on {device}: "
          f"web chat http://{args.host}:{args.port}/  API http://{args.host}:{args.port}/v1", file=sys.stderr)
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown; the app's lifespan then stops the batching worker.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
