"""Checkpoint interop: Hugging Face and Meta directories in, Hugging Face directories out.

Nothing here unpickles code: weights come from safetensors, or from `torch.load(weights_only=True)` for
Meta's `consolidated.NN.pth` shards and HF `pytorch_model*.bin` files.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llama2.model.args import ModelArgs
from llama2.model.transformer import Transformer


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded, with the file and the reason."""


# --- key maps ---------------------------------------------------------------------------------------------

_HF_LAYER_KEYS = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_TOP_KEYS = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def hf_to_ours_key(key: str) -> str | None:
    """Our parameter name for a HF `LlamaForCausalLM` key; None for keys we do not use (rotary buffers)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if m := _HF_LAYER_RE.match(key):
        layer, name = m.groups()
        if name in _HF_LAYER_KEYS:
            return f"layers.{layer}.{_HF_LAYER_KEYS[name]}.weight"
    elif key.endswith(".weight") and key[: -len(".weight")] in _HF_TOP_KEYS:
        return _HF_TOP_KEYS[key[: -len(".weight")]] + ".weight"
    raise CheckpointError(f"unexpected key in Hugging Face checkpoint: {key!r}")


def ours_to_hf_key(key: str) -> str:
    inverse_top = {v: k for k, v in _HF_TOP_KEYS.items()}
    inverse_layer = {v: k for k, v in _HF_LAYER_KEYS.items()}
    name = key[: -len(".weight")]
    if name in inverse_top:
        return inverse_top[name] + ".weight"
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{inverse_layer[rest]}.weight"


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates adjacent pairs (x0,x1),(x2,x3)…; HF pairs x[i] with x[i+hd/2]. Reorder each head's rows."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# --- configs ----------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _field(data: dict[str, Any], key: str, path: Path, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in data:
        if default is ...:
            raise CheckpointError(f"{path}: missing field {key!r}")
        return default
    value = data[key]
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise CheckpointError(f"{path}: field {key!r} must be {names}, got {value!r}")
    return value


def args_from_hf_config(path: Path, max_seq_len: int | None = None) -> ModelArgs:
    cfg = _read_json(path)
    dim = _field(cfg, "hidden_size", path, int)
    n_heads = _field(cfg, "num_attention_heads", path, int)
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != dim // n_heads:
        raise CheckpointError(f"{path}: head_dim {head_dim} != hidden_size / num_attention_heads; not supported")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    if (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")) or rope.get(
        "rope_type", "default"
    ) != "default":
        raise CheckpointError(f"{path}: rotary scaling {scaling or rope} is not supported (Llama 2 uses none)")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    try:
        return ModelArgs(
            dim=dim,
            n_layers=_field(cfg, "num_hidden_layers", path, int),
            n_heads=n_heads,
            n_kv_heads=_field(cfg, "num_key_value_heads", path, int, default=n_heads),
            vocab_size=_field(cfg, "vocab_size", path, int),
            ffn_hidden_dim=_field(cfg, "intermediate_size", path, int),
            norm_eps=float(_field(cfg, "rms_norm_eps", path, (int, float), default=1e-5)),
            rope_theta=float(theta),
            max_seq_len=max_seq_len or _field(cfg, "max_position_embeddings", path, int, default=4096),
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def args_from_meta_params(path: Path, vocab_size: int, max_seq_len: int | None = None) -> ModelArgs:
    params = _read_json(path)
    n_heads = _field(params, "n_heads", path, int)
    vocab = _field(params, "vocab_size", path, int, default=-1)
    try:
        return ModelArgs(
            dim=_field(params, "dim", path, int),
            n_layers=_field(params, "n_layers", path, int),
            n_heads=n_heads,
            n_kv_heads=_field(params, "n_kv_heads", path, int, default=None) or n_heads,
            vocab_size=vocab if vocab > 0 else vocab_size,
            multiple_of=_field(params, "multiple_of", path, int, default=256),
            ffn_dim_multiplier=_field(params, "ffn_dim_multiplier", path, (int, float), default=None),
            norm_eps=float(_field(params, "norm_eps", path, (int, float), default=1e-5)),
            rope_theta=float(_field(params, "rope_theta", path, (int, float), default=10000.0)),
            max_seq_len=max_seq_len or 4096,
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "initializer_range": args.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


# --- loading ----------------------------------------------------------------------------------------------


def detect_format(path: Path) -> str:
    if (path / "config.json").is_file():
        return "hf"
    if (path / "params.json").is_file():
        return "meta"
    if not path.exists():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    raise CheckpointError(
        f"{path}: not a checkpoint directory (expected config.json for Hugging Face or params.json for Meta format)"
    )


def _hf_weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: missing 'weight_map'")
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    raise CheckpointError(f"{path}: no weights found (model.safetensors, a sharded index, or pytorch_model.bin)")


def _iter_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield key, f.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from exc
    else:
        yield from _torch_load(file).items()


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{file}: cannot load weights safely ({exc})") from exc


def load_hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in _hf_weight_files(path):
        for key, tensor in _iter_file(file):
            ours = hf_to_ours_key(key)
            if ours is not None:
                state[ours] = tensor
    return state


def _merge_dim(key: str) -> int | None:
    """The dimension along which Meta's model-parallel shards split a weight (None: replicated)."""
    if key.endswith("norm.weight"):
        return None
    if key.startswith("tok_embeddings") or key.endswith(("wo.weight", "w2.weight")):
        return 1  # ParallelEmbedding and RowParallelLinear split the input dimension
    return 0  # ColumnParallelLinear: wq, wk, wv, w1, w3, output


def load_meta_state_dict(path: Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{path}: no consolidated.*.pth files found next to params.json")
    loaded = [_torch_load(f) for f in shards]
    keys = [k for k in loaded[0] if k != "rope.freqs"]
    for f, shard in zip(shards[1:], loaded[1:], strict=True):
        if set(shard) != set(loaded[0]):
            raise CheckpointError(f"{f}: holds different keys than {shards[0].name}")
    state = {}
    for key in keys:
        dim = _merge_dim(key)
        parts = [s[key] for s in loaded]
        state[key] = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
    for i in range(args.n_layers):
        wq, wk = f"layers.{i}.attention.wq.weight", f"layers.{i}.attention.wk.weight"
        if wq in state:
            state[wq] = permute_meta_to_hf(state[wq], args.n_heads)
        if wk in state:
            state[wk] = permute_meta_to_hf(state[wk], args.n_kv_heads)
    return state


def build_model(args: ModelArgs, state: dict[str, torch.Tensor], device, dtype: torch.dtype, source: Path):
    """A `Transformer` holding `state`, built on the meta device so the weights are never allocated twice."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{source}: missing weights: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{source}: weight {key} has shape {tuple(state[key].shape)}, the config implies {shape}"
            )
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    model.reset_rope()
    return model


def load_checkpoint(
    path: str | Path,
    vocab_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
) -> Transformer:
    """Load a HF or Meta checkpoint directory into our `Transformer` in `dtype` (default: fp32 on CPU,
    the checkpoint's own dtype on accelerators)."""
    path = Path(path)
    fmt = detect_format(path)
    device = torch.device(device or "cpu")
    if fmt == "hf":
        args = args_from_hf_config(path / "config.json", max_seq_len)
        state = load_hf_state_dict(path)
    else:
        if vocab_size is None:
            raise CheckpointError(f"{path}: a Meta checkpoint needs the tokenizer's vocab size (tokenizer.model)")
        args = args_from_meta_params(path / "params.json", vocab_size, max_seq_len)
        state = load_meta_state_dict(path, args)
    if dtype is None:
        stored = next(iter(state.values())).dtype
        dtype = torch.float32 if device.type == "cpu" else stored
    return build_model(args, state, device, dtype, path)


# --- saving -----------------------------------------------------------------------------------------------

MAX_SHARD_BYTES = 5 * 1024**3


def save_hf(
    model: Transformer,
    path: str | Path,
    tokenizer_model: str | Path | None = None,
    dtype: torch.dtype | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write a Hugging Face `LlamaForCausalLM` directory (sharded above 5 GiB) with its tokenizer files."""
    from llama2.tokenizer.hf_files import write_hf_tokenizer_files

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {ours_to_hf_key(k): v for k, v in model.state_dict().items() if not k.startswith("rope_")}
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    stored_dtype = next(iter(state.values())).dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if size + nbytes > MAX_SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config(model.args, stored_dtype), indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer_model is not None:
        src = Path(tokenizer_model)
        if src.resolve() != (out / "tokenizer.model").resolve():
            shutil.copyfile(src, out / "tokenizer.model")
        write_hf_tokenizer_files(out, model.args.max_seq_len, chat_template)
    return out
