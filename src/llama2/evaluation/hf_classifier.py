"""A Hugging Face sequence-classification directory as the toxicity judge (`--option classifier=DIR`).

This is how the paper's judge plugs in: ToxiGen's RoBERTa (`tomh/toxigen_roberta`), HateBERT, or any other
`AutoModelForSequenceClassification` checkpoint saved with its tokenizer. Loading is offline
(`local_files_only`), so a run never reaches the network in the middle of an evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MAX_LENGTH = 512


def resolve_toxic_index(id2label: dict[int, str], toxic_label: str | None) -> int:
    """The output index meaning "toxic": `toxic_label` as an index or a label name, else 1 (ToxiGen's RoBERTa
    and HateBERT call it LABEL_1)."""
    if toxic_label is None:
        index = 1
    elif toxic_label.isdigit():
        index = int(toxic_label)
    else:
        names = {name: i for i, name in id2label.items()}
        if toxic_label not in names:
            raise ValueError(f"toxic_label {toxic_label!r} is not one of the classifier's labels {sorted(names)}")
        index = names[toxic_label]
    if index not in id2label:
        raise ValueError(f"toxic label index {index} is outside the classifier's {len(id2label)} labels")
    return index


@dataclass
class HFToxicityClassifier:
    """P(toxic) = softmax over the classifier's labels at the toxic index, in padded batches."""

    path: Path
    model: Any
    tokenizer: Any
    toxic_index: int
    batch_size: int = 32

    @classmethod
    def load(cls, path: Path, device: str = "cpu", toxic_label: str | None = None,
             batch_size: int = 32) -> HFToxicityClassifier:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not path.is_dir():
            raise FileNotFoundError(f"classifier directory not found: {path}")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).to(device).eval()
        if model.config.num_labels < 2:
            raise ValueError(f"{path} has {model.config.num_labels} output; a toxicity classifier needs 2 or more")
        if tokenizer.pad_token is None:  # decoder-style tokenizers (Llama) ship without one; padding needs one
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:  # Llama-style heads find each row's last token through it
            model.config.pad_token_id = tokenizer.pad_token_id
        index = resolve_toxic_index({int(k): v for k, v in model.config.id2label.items()}, toxic_label)
        return cls(path, model, tokenizer, index, batch_size)

    @torch.inference_mode()
    def toxic_probability(self, texts: Sequence[str]) -> list[float]:
        probs: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                                   max_length=MAX_LENGTH, return_tensors="pt").to(device)
            logits = self.model(**batch).logits.float()  # (B, num_labels)
            probs += torch.softmax(logits, dim=-1)[:, self.toxic_index].tolist()
        return probs

    def describe(self) -> dict[str, Any]:
        return {"name": str(self.path), "toxic_label": self.model.config.id2label[self.toxic_index]}
