"""Scalar heads on the transformer trunk: the reward model (SPEC §7), and PPO's value model after it.

`ScalarHeadModel` is a `Transformer` whose next-token head is replaced by `score`, a `Linear(dim, 1)` read at
the last real token of each right-padded row. It saves as a Hugging Face `LlamaForSequenceClassification`
directory (`num_labels=1`, `score.weight`, `pad_token_id` set), which `transformers` scores identically
because its rule, "the rightmost token that is not `pad_token_id`", picks the same position as our
`lengths - 1` as long as the pad id never ends a real sequence (we pad with `<unk>`, which Llama's
byte-fallback tokenizer never emits).

With `likelihood_gate`, the reward also reads how surprised the chat model is by each response token (see
`ScalarHeadModel.likelihood_term`). That option keeps the frozen LM head and a small gate, saved in the same
directory (config key `llama2_likelihood_gate`); `transformers` loads the directory but ignores both, so its
score is the scalar head's part alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llama2.model.args import ModelArgs
from llama2.model.checkpoint import CheckpointError, args_from_hf_config, hf_config, hf_to_ours_key, save_hf
from llama2.model.transformer import Transformer

HEAD_FILE = "model-score.safetensors"
"""The head's own weight file when the trunk is sharded, listed in the index beside the shards."""
GATE_CONFIG_KEY = "llama2_likelihood_gate"
"""config.json flag of a reward model saved with a likelihood gate."""
GATE_SCALE = 30.0
"""The gate's output multiplier. AdamW moves each weight by about `lr` a step whatever its gradient, so a gate
started at zero barely moves in a short RM run at the trunk's learning rate; the multiplier gives it a 30×
larger step (demo pairs, one run each: held-out accuracy 0.671, against 0.645 with no multiplier and
0.624 at 100×)."""
GATE_START = 0.127
"""Weight of every response token's surprise before training (softplus(−2)): small, so the RM starts close to
a plain scalar head, and not zero, so the gate gets a gradient from the first step."""


class _NoLMHead(nn.Module):
    """Takes the place of the trunk's vocab × dim output matrix, which a scalar-head model never uses.

    It holds only an empty buffer named `weight`: the trunk reads `output.weight` for the device and dtype of
    its rotary tables and KV cache, and the buffer follows `.to()` without costing memory or a checkpoint key.
    """

    def __init__(self, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.register_buffer("weight", torch.empty(0, device=device, dtype=dtype), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a scalar-head model has no language-modelling head; call hidden_states instead")


class ScalarHeadModel(nn.Module):
    """`model(tokens, lengths)` → one fp32 scalar per row (B,): `score` applied to the last real token.

    `tokens` (B, T) are right-padded and `lengths` (B,) count the real tokens of each row. Causal attention
    means padding after a row's end never changes the hidden state at `lengths - 1`, so no mask is needed.
    """

    def __init__(self, trunk: Transformer, likelihood_gate: bool = False):
        super().__init__()
        weight = trunk.output.weight
        if likelihood_gate:
            trunk.output.requires_grad_(False)  # the chat model's predictions, kept as they were
        else:
            trunk.output = _NoLMHead(weight.device if weight.device.type != "meta" else None, weight.dtype)
        self.trunk = trunk
        self.score = nn.Linear(trunk.args.dim, 1, bias=False, device=weight.device, dtype=weight.dtype)
        self.likelihood_gate = (nn.Linear(trunk.args.dim, 1, device=weight.device, dtype=weight.dtype)
                                if likelihood_gate else None)

    @property
    def args(self) -> ModelArgs:
        return self.trunk.args

    @property
    def layers(self) -> nn.ModuleList:
        """The trunk's blocks, where the engine applies activation checkpointing, compile and FSDP."""
        return self.trunk.layers

    @classmethod
    def from_language_model(cls, model: Transformer, likelihood_gate: bool = False) -> ScalarHeadModel:
        """The reward model initialised from a chat checkpoint (SPEC §7), its head zero-initialised.

        A zero head gives every response reward 0, so training starts from loss log 2 (no margin) rather than
        from an arbitrary ranking, and the trunk is not pushed around by a random projection at the start;
        AdamW's first updates are about `lr` per weight whatever the gradient scale, so the head grows within
        a few steps (one step moves a reward by about lr · dim).
        """
        rm = cls(model, likelihood_gate)
        nn.init.zeros_(rm.score.weight)
        if rm.likelihood_gate is not None:
            nn.init.zeros_(rm.likelihood_gate.weight)
            nn.init.constant_(rm.likelihood_gate.bias, math.log(math.expm1(GATE_START)) / GATE_SCALE)
        return rm

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None,
                starts: torch.Tensor | None = None, pairs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Rewards (B,) of right-padded rows; `starts` (B,), the index of each row's first response token, is
        needed only with a likelihood gate. With `pairs` (`data.pair_rows`: one row per preference pair,
        `tokens` its rows), the rewards (2B,) of the chosen sides, then of the rejected sides."""
        if pairs is not None:
            return self._pair_rewards(pairs)
        h = self.trunk.hidden_states(tokens)  # (B, T, dim)
        last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # (B, dim)
        reward = self.score(last).squeeze(-1).float()  # (B,)
        if self.likelihood_gate is None:
            return reward
        if starts is None:
            raise ValueError("this reward model has a likelihood gate: give each row's response start (starts=)")
        return reward + self.likelihood_term(h, tokens, lengths, starts)

    def _pair_rewards(self, pairs: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = pairs["tokens"]
        h = self.trunk.hidden_states(tokens, mask=pairs["mask"], positions=pairs["positions"])
        rows = torch.arange(h.shape[0], device=h.device)
        last = torch.cat([h[rows, pairs["chosen_last"]], h[rows, pairs["rejected_last"]]])  # (2B, dim)
        reward = self.score(last).squeeze(-1).float()
        if self.likelihood_gate is None:
            return reward
        sides = torch.stack([pairs["in_chosen"], pairs["in_rejected"]])  # (2, B, L)
        terms = self.gated_surprise(h, tokens, pairs["predictor"], sides.any(0))  # (B, L)
        return reward + (terms * sides).sum(-1).flatten()

    def gated_surprise(self, h: torch.Tensor, tokens: torch.Tensor, predictor: torch.Tensor,
                       used: torch.Tensor) -> torch.Tensor:
        """(B, T): at each `used` position t, gate(h_p) · (logit of x_t − largest logit), both read at the state
        p = `predictor[b, t]` that predicts x_t under the frozen LM head; 0 elsewhere."""
        rows, cols = used.nonzero(as_tuple=True)
        states = h[rows, predictor[rows, cols]]  # (N, dim)
        logits = self.trunk.output(states).float()
        surprise = logits.gather(-1, tokens[rows, cols, None]).squeeze(-1) - logits.amax(dim=-1)  # ≤ 0
        weight = F.softplus(GATE_SCALE * self.likelihood_gate(states).squeeze(-1).float())
        return torch.zeros(used.shape, device=h.device).index_put((rows, cols), weight * surprise)

    def likelihood_term(self, h: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                        starts: torch.Tensor) -> torch.Tensor:
        """Σ over response tokens of gate(h_{t−1}) · (log p(x_t) − max log p), under the frozen LM head. The
        log-normaliser cancels in that difference, so it is the token's logit minus the largest logit.

        Why: a small RM fine-tuned on a few thousand pairs learns what a good answer looks like, not whether
        it is right (toy demo: 0.49 on arithmetic pairs of two plain answers, neither a refusal nor padded,
        and 0.68 on such fact pairs), although the chat model it starts from ranks the right fact first 97%
        of the time. The chat model's surprise at a
        token says exactly that; the gate, read from the state that predicted the token, learns which tokens'
        surprise matters (an answer's name or number) and which does not (a choice among phrasings).
        """
        target = torch.arange(tokens.shape[1], device=tokens.device)[None]  # (1, T)
        in_response = (target >= starts[:, None]) & (target < lengths[:, None])  # (B, T)
        predictor = (target - 1).clamp(min=0).expand_as(in_response)  # position t − 1 predicts token t
        return self.gated_surprise(h, tokens, predictor, in_response).sum(dim=-1)


# --- Hugging Face LlamaForSequenceClassification ------------------------------------------------------------


def sequence_classifier_config(args: ModelArgs, dtype: torch.dtype, pad_token_id: int) -> dict:
    """`hf_config` turned into a one-label `LlamaForSequenceClassification` config."""
    return {**hf_config(args, dtype), "architectures": ["LlamaForSequenceClassification"], "num_labels": 1,
            "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "pad_token_id": pad_token_id,
            "use_cache": False}


def save_scalar_head_hf(model: ScalarHeadModel, path: str | Path, pad_token_id: int,
                        tokenizer_model: str | Path | None = None) -> Path:
    """Write a Hugging Face sequence-classification directory.

    The trunk goes through `save_hf` (same key names and shard layout as a causal LM, minus `lm_head`); the
    head joins the single weight file, or, for a sharded model, gets its own file listed in the index.
    """
    out = save_hf(model.trunk, path, tokenizer_model=tokenizer_model)
    (out / "generation_config.json").unlink()
    head = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()
            if not name.startswith("trunk.")}
    index_path = out / "model.safetensors.index.json"
    if index_path.is_file():  # sharded (over 5 GiB): the head gets its own file in the index
        index = json.loads(index_path.read_text())
        save_file(head, str(out / HEAD_FILE), metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(head, HEAD_FILE))
        index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in head.values())
        index_path.write_text(json.dumps(index, indent=2))
    else:  # one file, which transformers reads without looking for an index: the head joins it
        single = out / "model.safetensors"
        with safe_open(str(single), framework="pt") as f:
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        save_file({**state, **head}, str(single), metadata={"format": "pt"})
    stored = next(iter(model.trunk.state_dict().values())).dtype
    config = sequence_classifier_config(model.args, stored, pad_token_id)
    if model.likelihood_gate is not None:
        config[GATE_CONFIG_KEY] = True
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                state[key] = f.get_tensor(key)
    return state


def load_scalar_head(path: str | Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[ScalarHeadModel, int]:
    """A saved `LlamaForSequenceClassification` directory → (model in eval mode, its pad_token_id)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if config.get("architectures") != ["LlamaForSequenceClassification"] or config.get("num_labels", 1) != 1:
        raise CheckpointError(f"{path}: not a one-label LlamaForSequenceClassification directory "
                              f"(architectures {config.get('architectures')}); is this a reward model?")
    args = args_from_hf_config(path / "config.json")
    raw = _read_weights(path)
    if "score.weight" not in raw:
        raise CheckpointError(f"{path}: missing score.weight")
    gated = bool(config.get(GATE_CONFIG_KEY))
    state = {key: raw.pop(key) for key in list(raw) if key.startswith(("score.", "likelihood_gate."))}
    for key, tensor in raw.items():
        ours = hf_to_ours_key(key)
        if ours is not None and (gated or ours != "output.weight"):
            state[f"trunk.{ours}"] = tensor
    with torch.device("meta"):
        model = ScalarHeadModel(Transformer(args), likelihood_gate=gated)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise CheckpointError(f"{path}: missing weights: {', '.join(missing[:5])}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True, strict=True)
    if not gated:
        model.trunk.output = _NoLMHead(torch.device(device), dtype)
    model.trunk.reset_rope()
    return model.eval(), int(config["pad_token_id"])
