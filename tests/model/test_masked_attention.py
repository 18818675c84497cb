import pytest
import torch
import torch.nn.functional as F

import llama2.model.masked_attention as masked_attention_module
from llama2.model.masked_attention import QUERY_TILE, key_spans, masked_attention


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T): causal within each run of equal doc ids, as packed SFT windows use."""
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & torch.ones_like(same[0]).tril())[:, None]


def random_docs(batch: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.rand(batch, seqlen, generator=generator) < 0.02
    return starts.cumsum(dim=1)


def assert_matches_dense_attention_and_its_gradients(attend, q, k, v, mask, weights):
    """`attend(q, k, v, mask)` against GQA-enabled dense SDPA: outputs and the gradients of a weighted sum."""
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    dense_grads = torch.autograd.grad((dense * weights).sum(), (q, k, v))
    tiled = attend(q, k, v, mask)
    tiled_grads = torch.autograd.grad((tiled * weights).sum(), (q, k, v))
    torch.testing.assert_close(tiled, dense, atol=1e-5, rtol=1e-5)
    for got, want in zip(tiled_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_key_spans_are_the_narrowest_ranges_holding_every_allowed_key():
    generator = torch.Generator().manual_seed(0)
    mask = block_causal_mask(random_docs(3, 3 * QUERY_TILE + 17, generator))
    spans = key_spans(mask)
    assert [(s, e) for s, e, _, _ in spans] == [(s, min(s + QUERY_TILE, mask.shape[-1]))
                                                for s in range(0, mask.shape[-1], QUERY_TILE)]
    for start, end, lo, hi in spans:
        allowed = mask[..., start:end, :].reshape(-1, mask.shape[-1]).any(dim=0).nonzero().flatten()
        assert (lo, hi) == (int(allowed.min()), int(allowed.max()) + 1)
        assert hi == end  # causal: nothing after the tile's last query
    assert spans[-1][2] > 0  # the last tile does not reach back to the window's start


def test_matches_dense_attention_and_its_gradients_on_packed_windows():
    generator = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, seqlen, head_dim = 2, 4, 2, 4 * QUERY_TILE + 5, 8
    mask = block_causal_mask(random_docs(batch, seqlen, generator))
    q = torch.randn(batch, heads, seqlen, head_dim, generator=generator, requires_grad=True)
    k = torch.randn(batch, kv_heads, seqlen, head_dim, generator=generator, requires_grad=True)
    v = torch.randn(batch, kv_heads, seqlen, head_dim, generator=generator, requires_grad=True)
    weights = torch.randn(batch, heads, seqlen, head_dim, generator=generator)
    assert_matches_dense_attention_and_its_gradients(
        lambda *a: masked_attention(*a, enable_gqa=True), q, k, v, mask, weights)


def test_a_mask_shared_by_the_batch_and_an_arbitrary_pattern_match_dense_attention():
    generator = torch.Generator().manual_seed(2)
    seqlen = 2 * QUERY_TILE + 3
    mask = torch.rand(1, 1, seqlen, seqlen, generator=generator) < 0.1
    mask |= torch.eye(seqlen, dtype=torch.bool)  # every row attends somewhere
    q, k, v = (torch.randn(3, 2, seqlen, 8, generator=generator) for _ in range(3))
    torch.testing.assert_close(masked_attention(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)


def test_compiled_code_keeps_the_tiles_and_matches_dense_attention_and_its_gradients():
    # the compiled training blocks call it inside a full graph: the tiles are one custom operator there
    generator = torch.Generator().manual_seed(3)
    batch, heads, kv_heads, seqlen, head_dim = 2, 4, 2, 3 * QUERY_TILE + 7, 8
    mask = block_causal_mask(random_docs(batch, seqlen, generator))
    # (B, T, H, hd) transposed, as the model hands them over
    q, k, v = (torch.randn(batch, seqlen, h, head_dim, generator=generator).transpose(1, 2).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    weights = torch.randn(batch, heads, seqlen, head_dim, generator=generator)
    targets = []

    def backend(graph_module, example_inputs):
        targets.extend(node.target for node in graph_module.graph.nodes)
        return graph_module

    compiled = torch.compile(lambda *a: masked_attention(*a, enable_gqa=True), fullgraph=True, backend=backend)
    assert_matches_dense_attention_and_its_gradients(compiled, q, k, v, mask, weights)
    assert torch.ops.llama2.tiled_attention.default in targets


@pytest.mark.parametrize("fast_bf16_attention", [True, False])
def test_bf16_matches_dense_attention_at_bf16_precision(monkeypatch, fast_bf16_attention):
    monkeypatch.setattr(masked_attention_module, "FAST_BF16_ATTENTION", fast_bf16_attention)
    generator = torch.Generator().manual_seed(4)
    mask = block_causal_mask(random_docs(2, 2 * QUERY_TILE + 9, generator))
    q, k, v = (torch.randn(2, 2, mask.shape[-1], 8, generator=generator).bfloat16().requires_grad_()
               for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    tiled = masked_attention(q, k, v, mask)
    assert tiled.dtype == torch.bfloat16
    torch.testing.assert_close(tiled, dense, atol=2e-2, rtol=2e-2)
    for got, want in zip(torch.autograd.grad(tiled.sum(), (q, k, v)), torch.autograd.grad(dense.sum(), (q, k, v)),
                         strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


def test_bf16_runs_the_kernels_in_fp32_where_bf16_attention_is_the_slower():
    """Without AMX (FAST_BF16_ATTENTION false) bf16 inputs are attended in fp32 and only the results rounded:
    the output is the fp32 computation's, rounded, and so are the gradients, within bf16 rounding."""
    generator = torch.Generator().manual_seed(5)
    mask = block_causal_mask(random_docs(2, 2 * QUERY_TILE + 9, generator))
    q, k, v = (torch.randn(2, 2, mask.shape[-1], 8, generator=generator).bfloat16() for _ in range(3))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(masked_attention_module, "FAST_BF16_ATTENTION", False)
        low = [x.clone().requires_grad_() for x in (q, k, v)]
        tiled = masked_attention(*low, mask)
        grads = torch.autograd.grad(tiled.float().sum(), low)
    full = [x.float().requires_grad_() for x in (q, k, v)]
    reference = masked_attention(*full, mask)
    reference_grads = torch.autograd.grad(reference.sum(), full)
    assert tiled.dtype == torch.bfloat16
    torch.testing.assert_close(tiled, reference.bfloat16(), atol=0, rtol=0)
    for got, want in zip(grads, reference_grads, strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1.6e-2)
