import json
import shutil

import pytest
import torch

from llama2 import Llama, ModelArgs, Transformer
from llama2.model import checkpoint
from llama2.model.checkpoint import CheckpointError, load_checkpoint, permute_hf_to_meta, save_hf

# Meta's fairscale layers: which dimension each weight is split along across model-parallel ranks.
META_SPLIT = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0, "output": 0}


def make_model(vocab: int, n_kv_heads: int = 2) -> Transformer:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=vocab, multiple_of=16,
                     max_seq_len=64)
    model = Transformer(args)
    model.init_weights(seed=5)
    return model


def write_meta_checkpoint(model: Transformer, path, tokenizer_path, shards: int = 2) -> None:
    """Meta's layout from our weights: interleaved rotary rows, weights split over `shards` files."""
    path.mkdir()
    args = model.args
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("rope_")}
    for i in range(args.n_layers):
        state[f"layers.{i}.attention.wq.weight"] = permute_hf_to_meta(state[f"layers.{i}.attention.wq.weight"], 4)
        state[f"layers.{i}.attention.wk.weight"] = permute_hf_to_meta(
            state[f"layers.{i}.attention.wk.weight"], args.n_kv_heads
        )
    parts = [{"rope.freqs": torch.zeros(8)} for _ in range(shards)]
    for key, tensor in state.items():
        kind = key.split(".")[-2]
        dim = META_SPLIT.get(kind)
        chunks = tensor.chunk(shards, dim=dim) if dim is not None else [tensor] * shards
        for part, chunk in zip(parts, chunks, strict=True):
            part[key] = chunk.clone()
    for rank, part in enumerate(parts):
        torch.save(part, path / f"consolidated.{rank:02d}.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": args.n_kv_heads, "multiple_of": 16,
              "norm_eps": 1e-5, "vocab_size": -1}
    (path / "params.json").write_text(json.dumps(params))
    shutil.copy(tokenizer_path, path / "tokenizer.model")


def test_meta_two_shard_checkpoint_loads_with_the_same_logits(tmp_path, tiny_tokenizer_path):
    model = make_model(vocab=320)
    write_meta_checkpoint(model, tmp_path / "meta", tiny_tokenizer_path)
    llm = Llama.load(tmp_path / "meta")
    assert llm.args.vocab_size == 320  # params.json says -1: taken from the tokenizer
    tokens = torch.randint(0, 320, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(llm.model(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def test_sharded_safetensors_round_trip(tmp_path, monkeypatch):
    model = make_model(vocab=97)
    monkeypatch.setattr(checkpoint, "MAX_SHARD_BYTES", 40_000)
    save_hf(model, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded = load_checkpoint(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_bf16_stays_bf16(tmp_path):
    save_hf(make_model(vocab=97), tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert model.output.weight.dtype == torch.bfloat16
    assert model(torch.zeros(1, 3, dtype=torch.long)).dtype == torch.float32
    assert load_checkpoint(tmp_path).output.weight.dtype == torch.float32  # CPU default


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="expected config.json"):
        load_checkpoint(tmp_path)
    save_hf(make_model(vocab=97), tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_checkpoint(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"tokenizer\.model not found"):
        Llama.load(tmp_path / "hf")


def test_wrong_shapes_name_the_weight(tmp_path):
    save_hf(make_model(vocab=97), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected = r"feed_forward\.w1\.weight has shape \(176, 64\), the config implies \(128, 64\)"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("{not json", "malformed JSON at line 1"),
        ('{"dim": 64, "n_layers": 2}', "missing field 'n_heads'"),
        ('{"dim": "64", "n_layers": 2, "n_heads": 4}', "field 'dim' must be int"),
        ('{"dim": 64, "n_layers": 2, "n_heads": 5}', "divisible by n_heads"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_params_json(tmp_path, tiny_tokenizer_path, params, message):
    write_meta_checkpoint(make_model(vocab=320), tmp_path / "meta", tiny_tokenizer_path)
    (tmp_path / "meta" / "params.json").write_text(params)
    with pytest.raises(CheckpointError, match=message) as info:
        Llama.load(tmp_path / "meta")
    assert "params.json" in str(info.value)


def test_meta_shards_with_different_keys_are_refused(tmp_path, tiny_tokenizer_path):
    write_meta_checkpoint(make_model(vocab=320), tmp_path / "meta", tiny_tokenizer_path)
    part = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
    del part["norm.weight"]
    torch.save(part, tmp_path / "meta" / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="different keys"):
        Llama.load(tmp_path / "meta")


def test_pickled_code_is_never_loaded(tmp_path, tiny_tokenizer_path):
    write_meta_checkpoint(make_model(vocab=320), tmp_path / "meta", tiny_tokenizer_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="cannot load weights safely"):
        Llama.load(tmp_path / "meta")
