"""`llama2 export`: write a checkpoint as a GGUF file (llama.cpp, ollama) or re-save it as a HF directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

GGUF_TYPES = ("f32", "f16", "q8_0")
HF_TYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to GGUF (llama.cpp / ollama) or a Hugging Face directory",
        description="Export a Hugging Face or Meta checkpoint directory. GGUF files carry the Llama metadata, "
        "the SentencePiece vocabulary and the Llama 2 chat template; --format hf writes a directory that "
        "transformers loads with identical logits.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face or Meta format)")
    p.add_argument("--format", required=True, choices=["gguf", "hf"], help="output format")
    p.add_argument("--out", required=True, help="output .gguf file (gguf) or directory (hf)")
    p.add_argument("--outtype", default=None, choices=sorted({*GGUF_TYPES, *HF_TYPES}),
                   help="weight type: gguf f32|f16|q8_0 (default f16), hf f32|f16|bf16 (default f32)")
    p.add_argument("--name", default=None, help="model name stored in the GGUF file (default: directory name)")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from llama2.generation.llama import Llama
    from llama2.stages.artifacts import model_dir

    allowed = GGUF_TYPES if args.format == "gguf" else tuple(HF_TYPES)
    outtype = args.outtype or ("f16" if args.format == "gguf" else "f32")
    if outtype not in allowed:
        raise ValueError(f"--outtype {outtype} does not apply to --format {args.format}; choose {', '.join(allowed)}")
    llm = Llama.load(model_dir(args.model), device="cpu")
    out = Path(args.out)
    if args.format == "gguf":
        from llama2.export.gguf import export_gguf

        name = args.name or Path(args.model).resolve().name
        summary = export_gguf(llm.model, llm.tokenizer, out, outtype, name=name)
        kinds = ", ".join(f"{n} {k.lower()}" for k, n in sorted(summary.tensor_types.items()))
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {summary.tensors} tensors: {kinds})",
              file=sys.stderr)
        print(f"run it: llama-cli -m {out} -cnv   (or ollama: FROM {out.resolve()} in a Modelfile)", file=sys.stderr)
    else:
        import torch

        llm.save(out, dtype=getattr(torch, HF_TYPES[outtype]))
        print(f"wrote {out}/ ({outtype} weights, config.json, tokenizer files)", file=sys.stderr)
    return 0
