"""Decoding and a training step on llama2.c's 15M "stories" shape, ours against `transformers`, fp32 CPU.

    python -m benchmarks.foundation_cpu

Batch-1 greedy decoding of 128 new tokens (our KV-cache generator, eager and with its compiled step, which
screens the output matrix for the greedy token, and with the compiled step computing every logit as it does
when log-probabilities are asked for; vs `LlamaForCausalLM.generate`), and one
AdamW training step on a batch of 8 x 256 tokens through the same loop for both models (ours with the loss as
the training engine computes it, the output layer fused with the cross-entropy). Same weights.
"""

from __future__ import annotations

import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.common import best_time, machine, markdown_table
from llama2 import ModelArgs, Transformer
from llama2.generation.generator import generate
from llama2.model.checkpoint import save_hf

NEW_TOKENS = 128


def _models():
    from transformers import LlamaForCausalLM

    args = ModelArgs.from_preset("stories15M", vocab_size=32000)
    ours = Transformer(args)
    ours.init_weights(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(ours, tmp)
        theirs = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return ours, theirs


def _decode_rows(ours, theirs) -> list[dict]:
    ours.eval()
    theirs.eval()
    prompt = [1, 450, 4799, 471]
    ids = torch.tensor([prompt])

    def run_ours(compile: bool = False, logprobs: bool = False):
        out = generate(ours, [prompt], NEW_TOKENS, stop_ids=[], temperature=0, compile=compile, logprobs=logprobs)
        assert len(out.tokens[0]) == NEW_TOKENS
        return out.tokens[0]

    def run_theirs():
        with torch.inference_mode():
            out = theirs.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                  pad_token_id=0)
        assert out.shape[1] == len(prompt) + NEW_TOKENS

    t_ours, t_theirs = best_time(run_ours, repeats=5), best_time(run_theirs, repeats=5)
    start = time.perf_counter()
    same = run_ours(compile=True) == run_ours()  # the first compiled call compiles the step
    compile_s = time.perf_counter() - start
    t_compiled = best_time(lambda: run_ours(compile=True), repeats=5)
    start = time.perf_counter()
    same_logits = run_ours(compile=True, logprobs=True) == run_ours()
    compile_logits_s = time.perf_counter() - start
    t_logits = best_time(lambda: run_ours(compile=True, logprobs=True), repeats=5)
    return [
        {"benchmark": "decode batch 1, 128 tokens", "impl": "llama2", "tokens/s": NEW_TOKENS / t_ours,
         "speedup": t_theirs / t_ours},
        {"benchmark": "decode batch 1, 128 tokens", "impl": f"llama2 compile=True (compiled once in {compile_s:.0f}s;"
         f" tokens {'equal' if same else 'differ'})", "tokens/s": NEW_TOKENS / t_compiled,
         "speedup": t_theirs / t_compiled},
        {"benchmark": "decode batch 1, 128 tokens", "impl": f"llama2 compile=True, logprobs=True (every logit;"
         f" compiled in {compile_logits_s:.0f}s; tokens {'equal' if same_logits else 'differ'})",
         "tokens/s": NEW_TOKENS / t_logits, "speedup": t_theirs / t_logits},
        {"benchmark": "decode batch 1, 128 tokens", "impl": "transformers", "tokens/s": NEW_TOKENS / t_theirs,
         "speedup": 1.0},
    ]


def _train_rows(ours, theirs) -> list[dict]:
    batch = torch.randint(0, 32000, (8, 257), generator=torch.Generator().manual_seed(0))
    x, y = batch[:, :-1], batch[:, 1:]

    def step_fn(model, loss_of):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)

        def step():
            loss = loss_of(model)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    # ours through the loss the training engine uses (the output layer fused with the cross-entropy), theirs
    # through the logits; the same number before any step
    ours_loss = lambda m: m(x, targets=y)  # noqa: E731
    theirs_loss = lambda m: F.cross_entropy(m(x).logits.float().flatten(0, 1), y.flatten())  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(ours_loss(ours), theirs_loss(theirs), rtol=1e-5, atol=1e-5)
    t_ours = best_time(step_fn(ours, ours_loss), repeats=5, warmup=2)
    t_theirs = best_time(step_fn(theirs, theirs_loss), repeats=5, warmup=2)
    tokens = x.numel()
    return [
        {"benchmark": "train step 8 x 256, AdamW", "impl": "llama2", "tokens/s": tokens / t_ours,
         "speedup": t_theirs / t_ours},
        {"benchmark": "train step 8 x 256, AdamW", "impl": "transformers", "tokens/s": tokens / t_theirs,
         "speedup": 1.0},
    ]


def run() -> list[dict]:
    torch.manual_seed(0)
    ours, theirs = _models()
    return _decode_rows(ours, theirs) + _train_rows(ours, theirs)


if __name__ == "__main__":
    print(f"machine: {machine()}")
    print(markdown_table(run()))
