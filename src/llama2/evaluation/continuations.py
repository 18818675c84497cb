"""Sampled continuations of text prompts, for the benchmarks that judge what a model writes (ToxiGen, BOLD).

SPEC §10.4: the paper decodes these benchmarks with temperature 0.1 and top-p 0.9. Batch `b` samples with seed
`seed + b` over prompts sorted by length, so a run repeats exactly for the same prompts, seed and batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from llama2.tokenizer.chat_format import encode_dialog

TEMPERATURE = 0.1
TOP_P = 0.9


def continue_prompts(
    llm,
    prompts: Sequence[str],
    max_gen_len: int,
    seed: int,
    batch_size: int,
    chat: bool = False,
    desc: str = "generating",
) -> list[str]:
    """Each prompt's continuation, in prompt order.

    Plain prompts are continued as text (BOS + prompt; a prompt too long for the context keeps its last tokens,
    as lm-eval does). With `chat=True` each prompt is one user turn in the Llama 2 chat format and the reply is
    returned. Continuations come from decoding prompt + generation together and cutting off the prompt, because
    SentencePiece drops the leading space of a piece decoded alone ("▁and" -> "and").
    """
    tok = llm.tokenizer
    if max_gen_len >= llm.args.max_seq_len:
        raise ValueError(f"max_gen_len {max_gen_len} leaves no room for a prompt in {llm.args.max_seq_len} tokens")
    keep = llm.args.max_seq_len - max_gen_len
    if chat:
        encoded = [encode_dialog(tok, [{"role": "user", "content": p}]) for p in prompts]
    else:
        encoded = [tok.encode(p, bos=True, eos=False)[-keep:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths pad less
    out: list[str] = [""] * len(prompts)
    batches = range(0, len(order), batch_size)
    for b, start in enumerate(tqdm(batches, desc=desc, unit="batch", leave=False)):
        batch = order[start : start + batch_size]
        generated = llm.generate([encoded[i] for i in batch], max_gen_len, TEMPERATURE, TOP_P, seed=seed + b)
        for i, ids in zip(batch, generated, strict=True):
            if chat:
                out[i] = tok.decode(ids)
            else:
                head = tok.decode(encoded[i])
                out[i] = tok.decode(encoded[i] + ids)[len(head) :]
    return out
