"""Decoding and a training step on llama2.c's 15M "stories" shape, ours against `transformers`, fp32 CPU.

    python -m benchmarks.foundation_cpu

Batch-1 greedy decoding of 128 new tokens (our KV-cache generator, eager and with its compiled step, which
screens the output matrix for the greedy token, and with the compiled step computing every logit as it does
when log-probabilities are asked for; vs `LlamaForCausalLM.generate`), and one
AdamW training step on a batch of 8 x 256 tokens through the same loop for both models (ours with the loss as
the training engine computes it, the output layer fused with the cross-entropy). Same weights. Each round times
every implementation once, in turn, and a speedup is the median of the rounds' ratios (`alternating_times`).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.common import alternating_times, machine, markdown_table, median_ratio
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

    start = time.perf_counter()
    same = run_ours(compile=True) == run_ours()  # the first compiled call compiles the step
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    same_logits = run_ours(compile=True, logprobs=True) == run_ours()
    compile_logits_s = time.perf_counter() - start
    times = alternating_times({"eager": run_ours, "compiled": lambda: run_ours(compile=True),
                               "logits": lambda: run_ours(compile=True, logprobs=True), "theirs": run_theirs})
    impls = {
        "eager": "llama2",
        "compiled": f"llama2 compile=True (compiled once in {compile_s:.0f}s; tokens {'equal' if same else 'differ'})",
        "logits": f"llama2 compile=True, logprobs=True (every logit; compiled in {compile_logits_s:.0f}s; tokens "
                  f"{'equal' if same_logits else 'differ'})",
        "theirs": "transformers",
    }
    return [{"benchmark": "decode batch 1, 128 tokens", "impl": impl,
             "tokens/s": NEW_TOKENS / statistics.median(times[k]), "speedup": median_ratio(times["theirs"], times[k])}
            for k, impl in impls.items()]


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
    times = alternating_times({"llama2": step_fn(ours, ours_loss), "transformers": step_fn(theirs, theirs_loss)},
                              warmup=2)
    return [{"benchmark": "train step 8 x 256, AdamW", "impl": impl, "tokens/s": x.numel() / statistics.median(t),
             "speedup": median_ratio(times["transformers"], t)} for impl, t in times.items()]


def run() -> list[dict]:
    torch.manual_seed(0)
    ours, theirs = _models()
    return _decode_rows(ours, theirs) + _train_rows(ours, theirs)


if __name__ == "__main__":
    print(f"machine: {machine()}")
    print(markdown_table(run()))
