"""How stages write the `model/` folder of each checkpoint: a Hugging Face directory for a `Transformer`."""

from __future__ import annotations

from pathlib import Path

import torch

from llama2.model.args import ModelArgs
from llama2.model.checkpoint import save_hf
from llama2.model.transformer import Transformer
from llama2.training.checkpointing import ModelExport


def hf_exporter(args: ModelArgs, tokenizer_model: str | Path | None) -> ModelExport:
    """An exporter that writes the gathered state dict with `save_hf` (fp32, as trained), plus the tokenizer."""

    def export(state: dict[str, torch.Tensor], path: Path) -> None:
        with torch.device("meta"):
            model = Transformer(args)  # no memory: the gathered tensors are assigned, not copied
        model.load_state_dict(state, strict=True, assign=True)
        save_hf(model, path, tokenizer_model=tokenizer_model)

    return export
