import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama2 import ModelArgs, Transformer
from llama2.model.checkpoint import save_hf
from llama2.model.transformer import RMSNorm, apply_rope, rope_tables


def tiny_args(n_kv_heads: int = 2, **kw) -> ModelArgs:
    return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=97, multiple_of=16,
                     max_seq_len=64, **kw)


def test_logits_are_fp32_with_the_right_shape():
    model = Transformer(tiny_args())
    model.init_weights(seed=0)
    tokens = torch.randint(0, 97, (3, 11))
    logits = model(tokens)
    assert logits.shape == (3, 11, 97) and logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(tokens).dtype == torch.float32


def test_kept_positions_give_those_logits_and_their_gradients():
    """`keep` computes the output layer only where a loss will be: the same logits, rows in row-major order,
    and the same gradients as slicing the full logits."""
    model = Transformer(tiny_args())
    model.init_weights(seed=0)
    tokens = torch.randint(0, 97, (2, 9))
    keep = torch.rand(2, 9, generator=torch.Generator().manual_seed(0)) < 0.4
    full = model(tokens)
    kept = model(tokens, keep=keep)
    assert kept.shape == (int(keep.sum()), 97)
    torch.testing.assert_close(kept, full[keep])
    grads = [torch.autograd.grad(out.square().sum(), model.parameters()) for out in (kept, full[keep])]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_causality_future_tokens_do_not_change_the_past():
    model = Transformer(tiny_args())
    model.init_weights(seed=0)
    a = torch.randint(0, 97, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 97
    with torch.no_grad():
        torch.testing.assert_close(model(a)[:, :8], model(b)[:, :8])
        assert not torch.allclose(model(a)[:, 8:], model(b)[:, 8:])


def test_rmsnorm_computes_in_fp32():
    norm = RMSNorm(8, eps=1e-5).bfloat16()
    x = torch.randn(2, 8).bfloat16()
    ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert norm(x).dtype == torch.bfloat16
    torch.testing.assert_close(norm(x), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_the_rotate_half_formula_exactly(dtype):
    """The flip-and-negate form gives bit for bit what Hugging Face's rotate_half (a concatenation) gives,
    also on the non-contiguous heads view attention passes in."""
    cos, sin = rope_tables(16, 10, 10000.0)
    x = torch.randn(2, 10, 3, 16).to(dtype).transpose(1, 2)  # (B, H, T, hd), as attention lays q and k out
    x1, x2 = x.chunk(2, dim=-1)
    ref = (x.float() * cos + torch.cat([-x2, x1], dim=-1).float() * sin).to(dtype)
    assert torch.equal(apply_rope(x, cos, sin), ref)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_incremental_decoding_equals_the_full_forward(n_kv_heads):
    model = Transformer(tiny_args(n_kv_heads))
    model.init_weights(seed=1)
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(2)
        pieces = [model(tokens[:, :6], start_pos=0), model(tokens[:, 6:9], start_pos=6)]
        pieces += [model(tokens[:, t : t + 1], start_pos=t) for t in range(9, 20)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_init_is_seeded_and_scales_residual_projections():
    a, b = Transformer(tiny_args()), Transformer(tiny_args())
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    wq, wo = a.layers[0].attention.wq.weight, a.layers[0].attention.wo.weight
    assert wq.std().item() == pytest.approx(0.02, rel=0.15)
    assert wo.std().item() == pytest.approx(0.02 / 2, rel=0.15)  # 1/sqrt(2 * n_layers) with 2 layers
    assert torch.equal(a.norm.weight, torch.ones(64))


def test_sequence_longer_than_the_rotary_table_is_refused():
    model = Transformer(tiny_args())
    with pytest.raises(ValueError, match="rotary table"):
        model(torch.zeros(1, 129, dtype=torch.long))


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_logits_match_transformers_both_directions(tmp_path, n_kv_heads):
    """Ours → HF directory → transformers, and transformers' own model → our loader."""
    args = tiny_args(n_kv_heads, rope_theta=500.0)
    ours = Transformer(args)
    ours.init_weights(seed=2)
    tokens = torch.randint(0, 97, (2, 23))
    save_hf(ours, tmp_path / "ours")
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max().item() <= 1e-4

    from llama2.model.checkpoint import load_checkpoint

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=n_kv_heads, vocab_size=97, rms_norm_eps=1e-5, rope_theta=500.0,
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "theirs")
    loaded = load_checkpoint(tmp_path / "theirs")
    assert loaded.args.hidden_dim == 96
    with torch.no_grad():
        assert (loaded(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4


def test_static_shape_decoding_equals_the_dynamic_path():
    model = Transformer(tiny_args(2))
    model.init_weights(seed=4)
    tokens = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(3, 32)
        steps = [model(tokens[:, :5], start_pos=0)]
        steps += [model(tokens[:, t : t + 1], start_pos=torch.tensor(t)) for t in range(5, 16)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
