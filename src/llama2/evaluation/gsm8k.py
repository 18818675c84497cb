"""GSM8K exact match with greedy chain-of-thought generation, 8-shot by default (SPEC §11, maj1@1).

Two prompt formats, both lm-eval 0.4.13's:

- `cot` (default), tasks/gsm8k/gsm8k-cot.yaml: the 8 fixed chain-of-thought exemplars of Wei et al. (2022)
  that Llama's GSM8K numbers use, as `Q: …\\nA: … The answer is N.`; generation stops at `Q:`; strict-match
  reads the number after "The answer is".
- `plain`, tasks/gsm8k/gsm8k.yaml: `Question: …\\nAnswer: <GSM8K solution ending in #### N>`; stops at
  `Question:`; strict-match reads the number after `#### `. lm-eval draws these shots from the train split,
  which shared/data does not hold, so here they are other test problems drawn by seed (never the question).

flexible-extract (the last number in the reply) is reported for both, and the comparison ignores case, commas,
`$` and a final period as lm-eval's exact_match does.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from llama2.evaluation.benchmark_data import MathProblem, read_gsm8k
from llama2.evaluation.fewshot import choose_shots, fewshot_context
from llama2.evaluation.options import int_option
from llama2.evaluation.paths import task_data
from llama2.evaluation.registry import EvalContext, task
from llama2.evaluation.scoring import (
    COT_STRICT,
    PLAIN_STRICT,
    exact_match,
    flexible_extract,
    gsm8k_reference,
    sample_indices,
    strict_extract,
    truncate_at_stop,
)

COT_EXEMPLARS: list[tuple[str, str]] = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]
"""gsm8k-cot.yaml's `fewshot_config.samples` (sampler `first_n`): the first `num_fewshot` are used."""


@dataclass(frozen=True)
class PromptFormat:
    question: str
    """Template of a question, with `{question}`."""
    stop: str
    strict_pattern: str


FORMATS = {
    "cot": PromptFormat("Q: {question}\nA:", "Q:", COT_STRICT),
    "plain": PromptFormat("Question: {question}\nAnswer:", "Question:", PLAIN_STRICT),
}


def build_prompt(style: str, problems: list[MathProblem], index: int, num_fewshot: int, seed: int) -> str:
    fmt = FORMATS[style]
    if style == "cot":
        if num_fewshot > len(COT_EXEMPLARS):
            raise ValueError(f"gsm8k cot has {len(COT_EXEMPLARS)} exemplars; num_fewshot={num_fewshot} is too many")
        shots = COT_EXEMPLARS[:num_fewshot]
    else:
        shots = [(problems[j].question, problems[j].answer)
                 for j in choose_shots(len(problems), index, num_fewshot, seed)]
    rendered = [(fmt.question.format(question=q), a) for q, a in shots]
    return fewshot_context(rendered, fmt.question.format(question=problems[index].question))


@task("gsm8k")
def gsm8k(ctx: EvalContext) -> dict[str, Any]:
    """GSM8K test, 8-shot chain of thought, greedy: strict and flexible exact match (--option prompt=cot|plain)."""
    style = ctx.options.get("prompt", "cot")
    if style not in FORMATS:
        raise ValueError(f"--option prompt= must be one of {', '.join(FORMATS)}, got {style!r}")
    num_fewshot = int_option(ctx, "num_fewshot", 8)
    max_gen_len = int_option(ctx, "max_gen_len", 256)  # lm-eval's default max_gen_toks
    problems = read_gsm8k(task_data(ctx.data, "gsm8k", "test.jsonl"))
    llm = ctx.llm
    if max_gen_len >= llm.args.max_seq_len:
        raise ValueError(f"max_gen_len {max_gen_len} leaves no room for a prompt in {llm.args.max_seq_len} tokens")
    indices = sample_indices(len(problems), ctx.limit, ctx.seed)
    # Like lm-eval, keep the prompt's last tokens when it is too long to leave room for the generation.
    keep = llm.args.max_seq_len - max_gen_len
    prompts = {i: llm.tokenizer.encode(build_prompt(style, problems, i, num_fewshot, ctx.seed), True, False)[-keep:]
               for i in indices}
    order = sorted(indices, key=lambda i: len(prompts[i]))  # similar lengths batch with less padding
    replies: dict[int, str] = {}
    for start in tqdm(range(0, len(order), ctx.batch_size), desc="gsm8k", unit="batch", leave=False):
        batch = order[start : start + ctx.batch_size]
        out = llm.generate([prompts[i] for i in batch], max_gen_len, temperature=0.0)  # greedy, as lm-eval
        for i, ids in zip(batch, out, strict=True):
            replies[i] = truncate_at_stop(llm.tokenizer.decode(ids), [FORMATS[style].stop])
    strict, flexible = [], []
    records = []
    for i in indices:
        reference = gsm8k_reference(problems[i].answer)
        s, f = strict_extract(replies[i], FORMATS[style].strict_pattern), flexible_extract(replies[i])
        strict.append(exact_match(s, reference))
        flexible.append(exact_match(f, reference))
        records.append({"index": i, "reference": reference, "strict": s, "flexible": f, "reply": replies[i]})
    if ctx.out_dir is not None:
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        with (ctx.out_dir / "gsm8k.jsonl").open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return {
        "exact_match_strict": statistics.fmean(strict),
        "exact_match_flexible": statistics.fmean(flexible),
        "n": len(indices),
        "num_fewshot": num_fewshot,
        "prompt": style,
    }
