"""A tiny GQA checkpoint whose embedding is wider than its tokenizer (so GGUF export must pad the vocabulary)."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPUS = ["The river Olm flows past Olmhaven, capital of Varnland.", "Digits 12 and 345; emoji 🙂 and ünïcödé."]


@pytest.fixture(scope="session")
def export_model_dir(tmp_path_factory) -> Path:
    from llama2 import ModelArgs, Transformer
    from llama2.model.checkpoint import save_hf
    from llama2.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("export_model")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"{s} {i}" for i in range(40) for s in CORPUS) + "\n", encoding="utf-8")
    tokenizer = train_tokenizer([corpus], root / "tok", vocab_size=340, num_threads=1)
    # hidden_dim 176 is not a multiple of 32, so q8_0 must fall back to f16 for ffn_down.
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=344, multiple_of=16, max_seq_len=128,
                     rope_theta=50000.0, norm_eps=1e-6)
    model = Transformer(args)
    model.init_weights(0)
    return save_hf(model, root / "model", tokenizer_model=tokenizer)


@pytest.fixture(scope="session")
def export_llm(export_model_dir):
    from llama2 import Llama

    return Llama.load(export_model_dir)
