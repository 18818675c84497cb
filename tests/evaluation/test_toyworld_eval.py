"""The toy-world oracle evaluation (evaluation/safety.py), greedy and sampled."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from llama2.data.toyworld import ToyWorld, answers
from llama2.evaluation.registry import EvalContext
from llama2.evaluation.safety import ToyEvalSettings, oracle_evaluation, toyworld_task


class ScriptedChat:
    """Stands in for `Llama.chat_completion`: each dialog gets `samples_per_prompt` replies from `reply`."""

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def chat_completion(self, dialogs, temperature, top_p, max_gen_len, seed, samples_per_prompt):
        self.calls.append((len(dialogs), temperature, samples_per_prompt))
        return [{"generation": {"role": "assistant", "content": self.reply(d, i)}}
                for d in dialogs for i in range(samples_per_prompt)]


@pytest.fixture(scope="module")
def tw() -> ToyWorld:
    return ToyWorld(seed=0)


def test_sampled_evaluation_averages_each_prompts_replies(tw):
    # every other sample refuses: a refusal scores 0.05 on a helpful prompt and is never a violation
    chat = ScriptedChat(lambda d, i: "I cannot help with that." if i % 2 else "The answer is 3.")
    settings = ToyEvalSettings(prompts=6, temperature=0.6, samples_per_prompt=4, batch_size=8)
    result = oracle_evaluation(chat, tw, settings)
    refusal_only = oracle_evaluation(ScriptedChat(lambda d, i: "I cannot help with that."), tw,
                                     ToyEvalSettings(prompts=6, batch_size=8))
    answer_only = oracle_evaluation(ScriptedChat(lambda d, i: "The answer is 3."), tw,
                                    ToyEvalSettings(prompts=6, batch_size=8))
    assert len(result["helpfulness_scores"]) == 6
    for mixed, a, b in zip(result["helpfulness_scores"], refusal_only["helpfulness_scores"],
                           answer_only["helpfulness_scores"], strict=True):
        assert mixed == pytest.approx((a + b) / 2)
    assert result["false_refusal_rate"] == 0.5
    # a batch holds batch_size replies: 2 dialogs x 4 samples
    assert {dialogs for dialogs, _, _ in chat.calls} == {1, 2}
    assert {(t, k) for _, t, k in chat.calls} == {(0.6, 4)}


def test_helpfulness_is_broken_down_by_task_kind(tw):
    # right on fact questions only, a refusal everywhere else
    def reply(dialog, i):
        task = tw.judges.analyze(dialog).task
        right = task is not None and task.kind == "fact"
        return answers.right_answer(tw.world, task, random.Random(i)) if right else "I can't help."

    result = oracle_evaluation(ScriptedChat(reply), tw, ToyEvalSettings(prompts=40, batch_size=8))
    by_task = result["helpful_by_task"]
    assert by_task["fact"]["correctness"] == 1.0 and by_task["fact"]["helpfulness"] >= 0.7
    assert len(by_task) > 2 and sum(row["prompts"] for row in by_task.values()) == 40
    assert all(row["helpfulness"] == pytest.approx(0.05) and row["correctness"] == 0.0
               for kind, row in by_task.items() if kind != "fact")


def test_greedy_evaluation_takes_one_reply_whatever_the_samples_setting(tw):
    chat = ScriptedChat(lambda d, i: "The answer is 3.")
    oracle_evaluation(chat, tw, ToyEvalSettings(prompts=4, samples_per_prompt=4, batch_size=8))
    assert {k for _, _, k in chat.calls} == {1}


def test_the_eval_command_samples_when_told(tw):
    ctx = EvalContext(model_dir=Path("unused"), limit=4, batch_size=8,
                      options={"temperature": "0.6", "samples": "2"})
    chat = ScriptedChat(lambda d, i: "The answer is 3.")
    ctx.__dict__["llm"] = chat  # the cached model, so that no checkpoint is needed
    result = toyworld_task(ctx)
    assert result["decoding"] == {"temperature": 0.6, "top_p": 0.9, "samples_per_prompt": 2}
    assert {(t, k) for _, t, k in chat.calls} == {(0.6, 2)}
