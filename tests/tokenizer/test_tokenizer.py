import pytest
import torch
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from transformers import AutoTokenizer

from llama2 import ModelArgs, Tokenizer, Transformer, encode_dialog
from llama2.model.checkpoint import save_hf
from llama2.tokenizer.train import train_tokenizer

# transformers 5's LlamaTokenizer pre-tokenizes with Metaspace(split=False), so a *run* of spaces merges
# differently from SentencePiece ("a  b": "▁a", "▁▁", "b" against "▁a", "▁", "▁b") and a leading space is
# swallowed. Single spaces, newlines and tabs match, as does every chat-format prompt.
TEXTS = [
    "Hello world",
    "trailing space ",
    "digits 1234567890 split one by one",
    "Ünïcödé, naïve café, 日本語, emoji 🙂🚀",
    "[INST] tags are plain text [/INST]",
    "line one\nline two\n\n\ttabbed",
]


def test_trained_tokenizer_uses_llama2_settings(tiny_tokenizer_path):
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(tiny_tokenizer_path.read_bytes())
    spec = proto.trainer_spec
    assert spec.model_type == sp_pb2.TrainerSpec.BPE
    assert spec.split_digits and spec.byte_fallback and spec.allow_whitespace_only_pieces
    assert (spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id) == (0, 1, 2, -1)
    assert proto.normalizer_spec.name == "identity" and not proto.normalizer_spec.remove_extra_whitespaces
    tok = Tokenizer(tiny_tokenizer_path)
    assert tok.n_words == 320
    digits = tok.encode("12345", bos=False, eos=False)
    assert [tok.decode([i]) for i in digits][-5:] == list("12345")
    # byte fallback: unseen characters survive the round trip
    assert tok.decode(tok.encode("zebra ∑ 🦓", bos=True, eos=True)) == "zebra ∑ 🦓"


def test_encode_adds_specials_on_request(tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    body = tok.encode("the river", bos=False, eos=False)
    assert tok.encode("the river", bos=True, eos=True) == [tok.bos_id, *body, tok.eos_id]
    with pytest.raises(TypeError, match="expects a str"):
        tok.encode(b"bytes", bos=True, eos=False)


def test_missing_or_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        Tokenizer(bad)


def test_train_rejects_tiny_vocab_and_empty_input(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="at least 260"):
        train_tokenizer([tmp_path / "empty.txt"], tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer([tmp_path / "empty.txt"], tmp_path, vocab_size=300)


@pytest.mark.parametrize("which", ["tiny", "llama2"])
def test_autotokenizer_loads_a_saved_directory_with_the_same_ids(tmp_path, request, which):
    path = request.getfixturevalue("tiny_tokenizer_path" if which == "tiny" else "llama2_tokenizer_path")
    tok = Tokenizer(path)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.n_words, multiple_of=16,
                                  max_seq_len=32))
    save_hf(model, tmp_path, tokenizer_model=path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert hf(text)["input_ids"] == tok.encode(text, bos=True, eos=False), text
        assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == tok.decode(tok.encode(text, True, False))
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"},
              {"role": "assistant", "content": "42"}, {"role": "user", "content": "And 7 * 6?"}]
    hf_ids = hf.apply_chat_template(dialog, tokenize=True)
    if not isinstance(hf_ids, list):
        hf_ids = hf_ids["input_ids"]
    assert hf_ids == encode_dialog(tok, dialog)
    assert torch.equal(torch.tensor(hf_ids), torch.tensor(encode_dialog(tok, dialog)))
