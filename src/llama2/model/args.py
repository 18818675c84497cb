"""Model hyperparameters and the named presets of the Llama 2 family (SPEC §1.2).

Presets are data, never `if name == ...` branches: the released shapes sit beside the tiny ones used
for the toy world, so the same code scales by changing only the preset name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ModelArgs:
    dim: int = 4096
    """Width of the residual stream."""
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means plain multi-head attention."""
    vocab_size: int = 32000
    multiple_of: int = 256
    """The SwiGLU hidden size is rounded up to a multiple of this (Meta's rule)."""
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None
    """An explicit SwiGLU hidden size, for checkpoints whose size does not follow Meta's rule (None: the rule)."""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    """Longest sequence the KV cache and rotary table are built for."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation for training from scratch (see `Transformer.init_weights`)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys read from a checkpoint's config that we keep but do not use."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        problems = []
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems:
            if self.dim % self.n_heads:
                problems.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
            if (self.dim // self.n_heads) % 2:
                problems.append(f"head_dim ({self.dim // self.n_heads}) must be even for rotary embeddings")
        if self.norm_eps <= 0:
            problems.append(f"norm_eps must be positive, got {self.norm_eps!r}")
        if self.rope_theta <= 0:
            problems.append(f"rope_theta must be positive, got {self.rope_theta!r}")
        if problems:
            raise ValueError("invalid ModelArgs: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size by Meta's rule: 2/3 of 4·dim, times the multiplier, rounded up."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self) -> int:
        """Exact parameter count of `Transformer(self)` (untied embedding and output)."""
        hd, kv = self.head_dim, self.n_kv_heads
        attn = self.dim * self.n_heads * hd * 2 + self.dim * kv * hd * 2
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        return 2 * self.vocab_size * self.dim + self.n_layers * per_layer + self.dim

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6·N plus the attention score term (PaLM's count)."""
        non_embedding = self.num_params() - self.vocab_size * self.dim
        return 6 * non_embedding + 12 * self.n_layers * self.dim * seq_len

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelArgs:
        key = name if name in PRESETS else name.upper() if name.upper() in PRESETS else name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[key], **overrides})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model config") -> ModelArgs:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{source}: unknown model field(s) {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# The released shapes (SPEC §1.2). 34B follows Code Llama 34B's published config with Llama 2's rope theta.
PRESETS: dict[str, dict[str, Any]] = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, multiple_of=256),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, multiple_of=256),
    "34B": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, multiple_of=256),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
    # ~1B shape for GPU benchmarks (Llama 2 architecture, 2048 wide, 16 layers, GQA 4:1).
    "1B": dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, multiple_of=256),
    # llama2.c's "stories15M" shape, for CPU benchmarks side by side with transformers.
    "stories15M": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, multiple_of=32, max_seq_len=256),
    # SPEC §13 tiny model, and smaller ones for the toy world on a laptop CPU.
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, multiple_of=32, max_seq_len=512, vocab_size=4096),
    "toy-demo": dict(dim=192, n_layers=6, n_heads=6, n_kv_heads=2, multiple_of=32, max_seq_len=1024,
                     vocab_size=2048),
    "toy-smoke": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=512,
                      vocab_size=1024),
}
