"""`llama2 generate` and `llama2 chat`: talk to a checkpoint from the terminal."""

from __future__ import annotations

import argparse
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint directory (Hugging Face or Meta format), or a run folder (its newest checkpoint)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype (default: float32 on CPU, the checkpoint's dtype on GPU)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--max-gen-len", type=int, default=256, help="most tokens to generate per reply")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--compile", action="store_true",
                   help="decode through a torch.compile'd step: about 3x faster on a CPU, after compiling it "
                        "(10-30 s, once per context length)")


def register(subparsers) -> None:
    g = subparsers.add_parser("generate", help="complete a text prompt (or a one-turn chat with --chat)")
    _add_model_args(g)
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat format")
    g.set_defaults(func=_generate)

    c = subparsers.add_parser("chat", help="interactive streaming chat (Ctrl-D or /exit to quit, /reset)")
    _add_model_args(c)
    c.add_argument("--system", default=None, help="system message for the whole conversation")
    c.set_defaults(func=_chat)


def _load(args: argparse.Namespace):
    import torch

    from llama2.generation.llama import Llama
    from llama2.stages.artifacts import model_dir

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return Llama.load(model_dir(args.model), device=device, dtype=dtype, compile=args.compile)


def _generate(args: argparse.Namespace) -> int:
    llm = _load(args)
    kwargs = dict(temperature=args.temperature, top_p=args.top_p, max_gen_len=args.max_gen_len, seed=args.seed)
    if args.chat:
        pieces = llm.chat_stream([{"role": "user", "content": args.prompt}], **kwargs)
    else:
        pieces = llm.stream_tokens(llm.tokenizer.encode(args.prompt, bos=True, eos=False), **kwargs)
        print(args.prompt, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    return 0


HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) quits"


def run_chat(llm, system: str | None, read=input, write=None, **kwargs) -> None:
    """The chat loop, with input and output injectable so tests can drive it. Each turn prefills only the new
    messages: the conversation's keys and values are kept in a prefix cache between turns."""
    from llama2.generation.prefix_cache import PrefixCache
    from llama2.tokenizer.chat_format import DialogError

    cache = PrefixCache()
    write = write or (lambda s: print(s, end="", flush=True))
    dialog = [{"role": "system", "content": system}] if system else []
    write(HELP + "\n")
    while True:
        try:
            line = read("\nyou> ")
        except EOFError:
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            dialog = dialog[:1] if system else []
            write("(conversation cleared)\n")
            continue
        turn = dialog + [{"role": "user", "content": text}]
        write("assistant> ")
        reply = []
        try:
            for piece in llm.chat_stream(turn, prefix_cache=cache, **kwargs):
                reply.append(piece)
                write(piece)
        except DialogError as exc:
            write(f"(error: {exc})\n")
            continue
        except KeyboardInterrupt:
            write(" [interrupted]")
        write("\n")
        dialog = turn + [{"role": "assistant", "content": "".join(reply)}]


def _chat(args: argparse.Namespace) -> int:
    llm = _load(args)
    try:
        run_chat(llm, args.system, temperature=args.temperature, top_p=args.top_p,
                 max_gen_len=args.max_gen_len, seed=args.seed)
    except KeyboardInterrupt:
        print("\nbye", file=sys.stderr)
    return 0
