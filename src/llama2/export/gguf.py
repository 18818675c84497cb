"""Export a model and its tokenizer to GGUF, the file format of llama.cpp and ollama.

What llama.cpp's `convert_hf_to_gguf.py` writes for a Llama 2 model, done from our weights directly:
- metadata under `llama.*` (context, width, depth, heads, KV heads, feed-forward size, rope theta, norm eps);
- the SentencePiece vocabulary ("llama" tokenizer model) with scores and token types, BOS/EOS/UNK ids, and
  the Llama 2 chat template;
- tensors under GGUF names. Our q/k rows are in the Hugging Face half-split rotary layout; llama.cpp rotates
  adjacent pairs (Meta's layout), so wq/wk are permuted back (`permute_hf_to_meta`), as the converter does.
Norm vectors stay f32 in every output type. Tensors are converted one at a time while writing, so peak
memory is the model plus one tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.constants import GGML_QUANT_VERSION
from gguf.quants import quant_shape_to_byte_shape, quantize

from llama2.model.checkpoint import permute_hf_to_meta
from llama2.model.transformer import Transformer
from llama2.tokenizer.hf_files import LLAMA2_CHAT_TEMPLATE
from llama2.tokenizer.tokenizer import Tokenizer

Q = GGMLQuantizationType
OUT_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}

# Our parameter names (Meta's) → GGUF tensor names, per layer and at the top.
LAYER_NAMES = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
}
TOP_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}


@dataclass(frozen=True)
class Vocab:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    out_type: str
    tensors: int
    bytes: int
    tensor_types: dict[str, str]
    """GGUF type name → how many tensors have it (q8_0 falls back to f16 for rows not a multiple of 32)."""


def gguf_name(ours: str) -> str:
    name = ours.removesuffix(".weight")
    if name in TOP_NAMES:
        return TOP_NAMES[name] + ".weight"
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{LAYER_NAMES[rest]}.weight"


def sentencepiece_vocab(tokenizer: Tokenizer, vocab_size: int) -> Vocab:
    """Every piece with its score and type; ids past the tokenizer (a padded embedding) become unused pads."""
    sp = tokenizer.sp_model
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    for i in range(sp.vocab_size(), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    return Vocab(tokens, scores, [int(t) for t in types])


def gguf_tensors(model: Transformer) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in llama.cpp's layout) per weight, in checkpoint order."""
    args = model.args
    for name, param in model.state_dict().items():
        if name.startswith("rope_"):
            continue
        w = param.detach().to("cpu", torch.float32)
        if name.endswith("attention.wq.weight"):
            w = permute_hf_to_meta(w, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = permute_hf_to_meta(w, args.n_kv_heads)
        yield gguf_name(name), w.contiguous().numpy()


def _tensor_type(array: np.ndarray, wanted: GGMLQuantizationType) -> GGMLQuantizationType:
    if array.ndim == 1:
        return Q.F32  # norms: tiny, and llama.cpp expects them in f32
    if wanted == Q.Q8_0 and array.shape[-1] % 32:
        return Q.F16  # q8_0 blocks are 32 values along a row
    return wanted


def _write_metadata(writer: GGUFWriter, model: Transformer, tokenizer: Tokenizer, file_type: LlamaFileType,
                    name: str, chat_template: str) -> None:
    args = model.args
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_vocab_size(args.vocab_size)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    vocab = sentencepiece_vocab(tokenizer, args.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(tokenizer.sp_model.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template)


def export_gguf(
    model: Transformer,
    tokenizer: Tokenizer,
    path: str | Path,
    out_type: str = "f16",
    name: str = "llama2",
    chat_template: str = LLAMA2_CHAT_TEMPLATE,
) -> ExportSummary:
    """Write `path` (a .gguf file) for llama.cpp / ollama."""
    if out_type not in OUT_TYPES:
        raise ValueError(f"unknown GGUF type {out_type!r}; choose one of {', '.join(OUT_TYPES)}")
    wanted, file_type = OUT_TYPES[out_type]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, "llama")
    _write_metadata(writer, model, tokenizer, file_type, name, chat_template)

    # Declare every tensor first (the header holds their shapes and offsets), then convert and write one by one.
    counts: dict[str, int] = {}
    total = 0
    for gname, array in gguf_tensors(model):
        qtype = _tensor_type(array, wanted)
        if qtype in (Q.F32, Q.F16):
            itemsize = 4 if qtype == Q.F32 else 2
            writer.add_tensor_info(gname, array.shape, np.dtype(np.float32 if qtype == Q.F32 else np.float16),
                                   array.size * itemsize)
            total += array.size * itemsize
        else:
            byte_shape = quant_shape_to_byte_shape(array.shape, qtype)
            nbytes = int(np.prod(byte_shape))
            writer.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
            total += nbytes
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, array in gguf_tensors(model):
            writer.write_tensor_data(quantize(array, _tensor_type(array, wanted)))  # casts, or q8_0 blocks
    finally:
        writer.close()
    return ExportSummary(path, out_type, sum(counts.values()), total, counts)
