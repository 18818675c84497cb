"""Ghost Attention: the data construction of SPEC §9, and the stage end to end with a stand-in sampler."""

from __future__ import annotations

import json

import pytest

from llama2 import ModelArgs, Tokenizer, Transformer, encode_dialog_for_training
from llama2.config import load_config
from llama2.data.toyworld import ToyWorld
from llama2.model.checkpoint import save_hf
from llama2.stages import gatt
from llama2.stages.artifacts import model_dir
from llama2.tokenizer.chat_format import IGNORE_INDEX


@pytest.fixture(scope="module")
def world():
    return ToyWorld(0)


REPLY = "The river is long and the water is cold in the winter months here."  # over a 12-word limit


class ObedientSometimes:
    """Stands in for the chat model: obeys the instruction appended to the user turn on every other sample."""

    def __init__(self, world, tokenizer, max_seq_len=4096):
        self.world, self.tokenizer, self.calls = world, tokenizer, []
        self.args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=tokenizer.n_words, max_seq_len=max_seq_len,
                              multiple_of=16)

    def chat_completion(self, dialogs, samples_per_prompt=1, **kw):
        self.calls.append(dialogs)
        out = []
        for k, d in enumerate(d for d in dialogs for _ in range(samples_per_prompt)):
            constraints, rest = self.world.constraints.parse(d[-1]["content"])
            reply = self.world.constraints.apply(constraints, REPLY) if self.obeys(k, d) else "No."
            out.append({"generation": {"role": "assistant", "content": reply}})
        return out

    def obeys(self, k, dialog):
        return k % 2 == 1


def test_instruction_only_in_the_system_message_and_earlier_turns_masked(world, tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    cfg = gatt.GAttData(dialogs=3, min_turns=3, max_turns=3, samples_per_turn=2)
    (cs, text), = gatt.sample_instructions(cfg, world, 1)
    conv = gatt.Conversation(cs, text, ["first question", "second question", "third question"],
                             ["reply one", "reply two", "reply three"])
    sampling = conv.sampling_dialog(2)
    assert all(m["content"].endswith(text) for m in sampling if m["role"] == "user")
    assert [m["role"] for m in sampling] == ["user", "assistant", "user", "assistant", "user"]
    example = conv.training_dialog(2)
    assert example[0] == {"role": "system", "content": text}
    assert all(text not in m["content"] for m in example[1:])
    ids, labels = encode_dialog_for_training(tok, example, train_on="last")
    trained = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert trained == tok.encode("reply three ", bos=False, eos=True)
    assert labels[: len(ids) - len(trained)] == [IGNORE_INDEX] * (len(ids) - len(trained))


def test_replies_are_kept_only_when_the_checker_accepts_them(world, tiny_tokenizer_path):
    cfg = gatt.GAttData(dialogs=4, min_turns=2, max_turns=3, samples_per_turn=2, max_gen_len=8)
    llm = ObedientSometimes(world, Tokenizer(tiny_tokenizer_path))
    turns = gatt.user_turns(cfg, world)
    convs = [gatt.Conversation(cs, text, users)
             for (cs, text), users in zip(gatt.sample_instructions(cfg, world, 4), turns, strict=True)]
    stats = gatt.sample_replies(llm, world, convs, cfg)
    # The stand-in's obedient reply passes for some constraint sets (not, e.g., a tight word limit); a
    # dialog whose reply fails goes on with the first sample ("No.") as context.
    passes = [world.check_constraint(c.constraints, world.constraints.apply(c.constraints, REPLY))
              for c in convs]
    assert any(passes) and not all(passes)
    for c, ok in zip(convs, passes, strict=True):
        assert len(c.replies) == len(c.users) and c.accepted == [ok] * len(c.users)
        assert all(world.check_constraint(c.constraints, r) == ok for r in c.replies)
    assert stats["turns_accepted"] == sum(map(sum, (c.accepted for c in convs)))
    assert stats["replies_sampled"] == 2 * stats["turns_sampled"] == 2 * sum(len(c.users) for c in convs)
    assert len(llm.calls) == 3 and len(llm.calls[0]) == 4  # one call a turn, each dialog once (2 samples each)


def test_a_turn_without_an_accepted_reply_is_context_for_later_turns_not_an_example(world, tiny_tokenizer_path):
    class ObeysFromTheSecondTurn(ObedientSometimes):
        def obeys(self, k, dialog):
            return sum(m["role"] == "user" for m in dialog) > 1

    cfg = gatt.GAttData(dialogs=2, min_turns=3, max_turns=3, samples_per_turn=2)
    instructions = [(cs, t) for cs, t in gatt.sample_instructions(cfg, world, 40)
                    if world.check_constraint(cs, world.constraints.apply(cs, REPLY))][:2]
    convs = [gatt.Conversation(cs, t, u) for (cs, t), u in zip(instructions, gatt.user_turns(cfg, world), strict=True)]
    llm = ObeysFromTheSecondTurn(world, Tokenizer(tiny_tokenizer_path))
    assert gatt.sample_replies(llm, world, convs, cfg)["turns_accepted"] == 4
    examples = gatt.training_examples(convs)
    assert [c.accepted for c in convs] == [[False, True, True]] * 2 and len(examples) == 4
    assert [len(e) for e in examples] == [5, 7, 5, 7]  # system + turns 1-2, system + turns 1-3
    assert all(e[2]["content"] == "No." for e in examples)  # the refused first turn stays as context


def test_a_dialog_ends_at_a_turn_whose_samples_are_all_empty(world, tiny_tokenizer_path):
    class SilentAtTheSecondTurn(ObedientSometimes):
        def chat_completion(self, dialogs, samples_per_prompt=1, **kw):
            out = super().chat_completion(dialogs, samples_per_prompt, **kw)
            second = sum(m["role"] == "user" for m in dialogs[0]) == 2
            return [{"generation": {"role": "assistant", "content": " "}} for _ in out] if second else out

    cfg = gatt.GAttData(dialogs=2, min_turns=3, max_turns=3, samples_per_turn=2)
    convs = [gatt.Conversation(cs, t, u) for (cs, t), u in
             zip(gatt.sample_instructions(cfg, world, 2), gatt.user_turns(cfg, world), strict=True)]
    llm = SilentAtTheSecondTurn(world, Tokenizer(tiny_tokenizer_path))
    gatt.sample_replies(llm, world, convs, cfg)
    assert len(llm.calls) == 2 and all(len(c.replies) == len(c.accepted) == 1 for c in convs)


@pytest.mark.slow
def test_gatt_stage_end_to_end(tmp_path, world, tiny_tokenizer_path, monkeypatch):
    tok = Tokenizer(tiny_tokenizer_path)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                  multiple_of=16, max_seq_len=512))
    model.init_weights(seed=0)
    start = save_hf(model, tmp_path / "chat", tokenizer_model=tiny_tokenizer_path)
    monkeypatch.setattr(gatt.Llama, "load", classmethod(lambda cls, path, **kw: ObedientSometimes(world, tok)))
    cfg = load_config(gatt.Config, overrides=[
        f"out_dir={tmp_path / 'gatt'}", f"init_from={start}", "data.dialogs=6", "data.min_turns=2",
        "data.max_turns=3", "data.samples_per_turn=2", "epochs=1", "train.micro_batch_size=1",
        "train.global_batch_size=2", "train.progress_bar=false", "train.precision=fp32", "train.device=cpu",
        "train.peak_tflops=1",
    ])
    result = gatt.run(cfg)
    report = json.loads((tmp_path / "gatt" / "report.json").read_text())
    lines = (tmp_path / "gatt" / "gatt_train.jsonl").read_text().splitlines()
    assert report["examples"] == len(lines) == report["turns_accepted"] > 0
    # every other sample obeys; a set the obedient reply cannot satisfy (a word limit) is never accepted
    assert report["acceptance_rate"] == pytest.approx(report["turns_accepted"] / report["replies_sampled"])
    assert 0 < report["acceptance_rate"] <= 0.5
    assert result.step >= 1 and model_dir(tmp_path / "gatt") == result.checkpoint / "model"
