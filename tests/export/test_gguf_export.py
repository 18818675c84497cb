"""GGUF export: read back with `gguf.GGUFReader`, and independently through transformers' GGUF loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from gguf.quants import dequantize

from llama2.cli import main
from llama2.export.gguf import export_gguf, gguf_name
from llama2.model.checkpoint import permute_hf_to_meta
from llama2.tokenizer.hf_files import LLAMA2_CHAT_TEMPLATE

Q = GGMLQuantizationType


@pytest.fixture(scope="module")
def exported(export_llm, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(export_llm.model, export_llm.tokenizer, out / f"tiny-{t}.gguf", t, name="tiny").path
            for t in ("f32", "f16", "q8_0")}


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def test_metadata_describes_the_model(exported, export_llm):
    reader = GGUFReader(exported["q8_0"])
    a, tok = export_llm.args, export_llm.tokenizer
    expected = {
        "general.architecture": "llama", "general.name": "tiny", "general.file_type": 7,
        "llama.context_length": a.max_seq_len, "llama.embedding_length": a.dim, "llama.block_count": a.n_layers,
        "llama.feed_forward_length": a.hidden_dim, "llama.attention.head_count": a.n_heads,
        "llama.attention.head_count_kv": a.n_kv_heads, "llama.rope.dimension_count": a.head_dim,
        "llama.vocab_size": a.vocab_size, "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False, "tokenizer.chat_template": LLAMA2_CHAT_TEMPLATE,
    }
    assert {k: _field(reader, k) for k in expected} == expected
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(50000.0)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert _field(GGUFReader(exported["f32"]), "general.file_type") == 0
    assert _field(GGUFReader(exported["f16"]), "general.file_type") == 1


def test_vocabulary_has_pieces_scores_and_types(exported, export_llm):
    reader = GGUFReader(exported["f32"])
    sp = export_llm.tokenizer.sp_model
    tokens, scores, types = (_field(reader, f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    n = sp.vocab_size()
    assert len(tokens) == len(scores) == len(types) == export_llm.args.vocab_size == n + 4
    assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)]
    assert scores[:n] == pytest.approx([sp.get_score(i) for i in range(n)])
    assert types[:3] == [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    assert types[3:259] == [TokenType.BYTE] * 256 and tokens[3] == "<0x00>"
    assert set(types[259:n]) == {TokenType.NORMAL}
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 4)] and set(types[n:]) == {TokenType.UNUSED}


@pytest.mark.parametrize("out_type, tolerance", [("f32", 0.0), ("f16", 1e-3), ("q8_0", 1 / 127)])
def test_tensors_round_trip(exported, export_llm, out_type, tolerance):
    reader = GGUFReader(exported[out_type])
    tensors = {t.name: t for t in reader.tensors}
    args = export_llm.args
    state = {k: v for k, v in export_llm.model.state_dict().items() if not k.startswith("rope_")}
    assert set(tensors) == {gguf_name(k) for k in state}
    for key, weight in state.items():
        t = tensors[gguf_name(key)]
        if key.endswith("attention.wq.weight"):
            weight = permute_hf_to_meta(weight, args.n_heads)  # llama.cpp's rotary layout
        elif key.endswith("attention.wk.weight"):
            weight = permute_hf_to_meta(weight, args.n_kv_heads)
        expected = weight.numpy()
        if weight.ndim == 1 or out_type == "f32":
            want = Q.F32
        elif out_type == "q8_0" and weight.shape[-1] % 32 == 0:
            want = Q.Q8_0
        else:
            want = Q.F16
        assert t.tensor_type == want, key
        assert list(t.shape) == list(reversed(weight.shape)), key  # GGUF lists dims innermost first
        values = dequantize(t.data, t.tensor_type).reshape(expected.shape)
        bound = tolerance * np.abs(expected).max() if want != Q.F32 else 0.0
        np.testing.assert_allclose(values, expected, rtol=0, atol=bound, err_msg=key)


@pytest.mark.parametrize("out_type, atol", [("f32", 1e-5), ("q8_0", 0.05)])
def test_transformers_gguf_loader_gives_the_same_logits(exported, export_llm, out_type, atol):
    """An independent reader: transformers maps GGUF names back and undoes llama.cpp's q/k permutation."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = str(exported[out_type])
    read = load_gguf_checkpoint(path)["config"]
    assert read["rope_theta"] == pytest.approx(50000.0) and read["num_key_value_heads"] == 2
    config = LlamaConfig(**read)
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"])
    ids = torch.tensor([export_llm.tokenizer.encode("The river Olm flows past Olmhaven 12", bos=True, eos=False)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, export_llm.model(ids), atol=atol, rtol=0)


def test_export_command_writes_gguf_and_hf(export_model_dir, export_llm, tmp_path, capsys):
    from llama2 import Llama

    gguf_path = tmp_path / "m.gguf"
    assert main(["export", "--model", str(export_model_dir), "--format", "gguf", "--out", str(gguf_path)]) == 0
    assert GGUFReader(gguf_path).fields["general.file_type"].contents() == 1  # f16 by default
    assert "wrote" in capsys.readouterr().err

    hf_dir = tmp_path / "hf"
    assert main(["export", "--model", str(export_model_dir), "--format", "hf", "--out", str(hf_dir)]) == 0
    ids = torch.tensor([[1, 40, 50, 60]])
    with torch.no_grad():
        torch.testing.assert_close(Llama.load(hf_dir).model(ids), export_llm.model(ids), atol=0, rtol=0)

    assert main(["export", "--model", str(export_model_dir), "--format", "hf", "--out", str(hf_dir),
                 "--outtype", "q8_0"]) == 1
    assert "does not apply" in capsys.readouterr().err
