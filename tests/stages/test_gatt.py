"""Ghost Attention: the data construction of SPEC §9, and the stage end to end with a stand-in sampler."""

from __future__ import annotations

import json

import pytest

from llama2 import ModelArgs, Tokenizer, Transformer, encode_dialog, encode_dialog_for_training
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


def test_balanced_instructions_deal_every_seen_value_evenly(world):
    seen = {c.value for c in world.constraints.pool(False) if c.kind == "hobby"}
    counts = {}
    for balanced in (True, False):
        instructions = gatt.sample_instructions(gatt.GAttData(balanced=balanced), world, 90)
        hobbies = [c.value for cs, _ in instructions for c in cs if c.kind == "hobby"]
        counts[balanced] = {h: hobbies.count(h) for h in seen}
        assert all(len({c.kind for c in cs}) == len(cs) for cs, _ in instructions)  # still one per kind
    assert max(counts[True].values()) - min(counts[True].values()) <= 1
    assert max(counts[False].values()) - min(counts[False].values()) > 1  # independent draws are uneven


def test_every_seen_hobby_can_be_asked_for_in_every_seen_language(world):
    seen = world.constraints.pool(False)
    hobbies = {c.value for c in seen if c.kind == "hobby"}
    languages = {c.value for c in seen if c.kind == "language"}
    plain = gatt.sample_instructions(gatt.GAttData(), world, 88)
    covered = gatt.sample_instructions(gatt.GAttData(hobbies_in_language=3), world, 88)

    def pairs(instructions):
        return [(h.value, lang.value) for cs, _ in instructions for h in cs if h.kind == "hobby"
                for lang in cs if lang.kind == "language"]

    assert {(h, lang) for h in hobbies for lang in languages} - set(pairs(plain))  # drawn at random, some are missing
    n = 3 * len(hobbies) * len(languages)
    assert len(covered) == 88 + n and covered[:88] == plain  # on top of the random ones, which stay as they were
    assert all(pairs(covered[88:]).count((h, lang)) == 3 for h in hobbies for lang in languages)
    cfg = gatt.GAttData(dialogs=88, min_turns=2, max_turns=9)
    assert gatt.user_turns(cfg, world, 88 + n)[:88] == gatt.user_turns(cfg, world)  # and keep their turns


def test_instruction_only_in_the_system_message_and_rejected_replies_masked(world, tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    cfg = gatt.GAttData(dialogs=3, min_turns=3, max_turns=3, samples_per_turn=2)
    (cs, text), = gatt.sample_instructions(cfg, world, 1)
    conv = gatt.Conversation(cs, text, ["first question", "second question", "third question", "fourth"],
                             ["reply one", "reply two", "reply three", "reply four"], [True, False, True, False])
    sampling = conv.sampling_dialog(2)
    assert all(m["content"].endswith(text) for m in sampling if m["role"] == "user")
    assert [m["role"] for m in sampling] == ["user", "assistant", "user", "assistant", "user"]
    example = conv.training_dialog()
    assert example[0] == {"role": "system", "content": text}
    assert all(text not in m["content"] for m in example[1:])
    assert len(example) == 7  # up to the last accepted turn
    ids, labels = encode_dialog_for_training(tok, example)
    trained = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert trained == tok.encode("reply one ", bos=False, eos=True) + tok.encode("reply three ", bos=False, eos=True)


def test_one_dialog_trains_exactly_the_papers_per_turn_examples(world, tiny_tokenizer_path):
    """The paper: one example per turn, the loss on its last reply only. Attention is causal, so each accepted
    reply's token losses within the whole dialog equal those of its own example."""
    import torch
    import torch.nn.functional as F

    tok = Tokenizer(tiny_tokenizer_path)
    (cs, text), = gatt.sample_instructions(gatt.GAttData(), world, 1)
    conv = gatt.Conversation(cs, text, ["one?", "two?", "three?"], ["first answer", "a no", "third answer"],
                             [True, False, True])
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tok.n_words, multiple_of=16))
    model.init_weights(seed=0)

    def trained_losses(dialog):
        ids, labels = encode_dialog_for_training(tok, dialog)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, :-1]
        losses = F.cross_entropy(logits, torch.tensor(labels[1:]), reduction="none")
        return [loss for loss, label in zip(losses.tolist(), labels[1:], strict=True) if label != IGNORE_INDEX]

    whole = trained_losses(conv.training_dialog())
    dialog = conv.training_dialog()
    per_turn = []
    for turn in (0, 2):  # the accepted turns, each with every earlier reply masked
        example = [dict(m) for m in dialog[: 3 + 2 * turn]]
        for m in example[1:-1]:
            if m["role"] == "assistant":
                m["weight"] = 0
        per_turn += trained_losses(example)
    assert whole == pytest.approx(per_turn, abs=1e-5) and len(whole) > 4


def test_the_instruction_leaves_the_earliest_user_messages_first_when_the_context_is_full(world, tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    cfg = gatt.GAttData(dialogs=1, min_turns=6, max_turns=6, samples_per_turn=1, max_gen_len=8)
    (cs, text), = gatt.sample_instructions(cfg, world, 1)
    users = ["What is the capital of a land far away from here?"] * 6
    conv = gatt.Conversation(cs, text, users, ["Yes."] * 5)
    full = len(encode_dialog(tok, conv.sampling_dialog(5, system=True)))
    llm = ObedientSometimes(world, tok, max_seq_len=full)  # the whole form no longer fits at turn 6
    context, appended_from = gatt._fitting_context(llm, conv, 5, cfg)
    appended = [m["content"].endswith(text) for m in context if m["role"] == "user"]
    assert 0 < appended_from < 5 and appended == [t >= appended_from for t in range(6)]
    assert len(encode_dialog(tok, context)) + cfg.max_gen_len < full
    assert gatt._fitting_context(ObedientSometimes(world, tok, max_seq_len=40), conv, 5, cfg) is None


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
    assert stats["replies_passing"] == stats["turns_accepted"]  # one of each accepted turn's two samples obeys
    assert stats["replies_sampled"] == 2 * stats["turns_sampled"] == 2 * sum(len(c.users) for c in convs)
    assert len(llm.calls) == 3 and len(llm.calls[0]) == 4  # one call a turn, each dialog once (2 samples each)


def test_a_turn_without_an_accepted_reply_is_context_for_later_turns_not_trained(world, tiny_tokenizer_path):
    class ObeysFromTheSecondTurn(ObedientSometimes):
        def obeys(self, k, dialog):
            return sum(m["role"] == "user" for m in dialog) > 1

    cfg = gatt.GAttData(dialogs=2, min_turns=3, max_turns=3, samples_per_turn=2)
    instructions = [(cs, t) for cs, t in gatt.sample_instructions(cfg, world, 40)
                    if world.check_constraint(cs, world.constraints.apply(cs, REPLY))][:2]
    convs = [gatt.Conversation(cs, t, u) for (cs, t), u in zip(instructions, gatt.user_turns(cfg, world), strict=True)]
    llm = ObeysFromTheSecondTurn(world, Tokenizer(tiny_tokenizer_path))
    assert gatt.sample_replies(llm, world, convs, cfg)["turns_accepted"] == 4
    dialogs = gatt.training_dialogs(convs)
    assert [c.accepted for c in convs] == [[False, True, True]] * 2 and [len(d) for d in dialogs] == [7, 7]
    for d in dialogs:  # the refused first turn stays as context, not trained
        assert d[2] == {"role": "assistant", "content": "No.", "weight": 0}
        assert "weight" not in d[4] and "weight" not in d[6]


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


def test_a_reply_cut_off_mid_sentence_is_context_only_even_when_the_checker_passes_it(world):
    backspeak = [c for c in world.constraints.all if c.value == "Backspeak"]
    cut, whole, english = "ehT rewsna si", "ehT rewsna si 42.", "The answer is 42."
    assert world.check_constraint(backspeak, cut) and world.check_constraint(backspeak, whole)
    assert not world.check_constraint(backspeak, english)
    cfg = gatt.GAttData()
    assert gatt._choose_reply(world, backspeak, [cut, whole], cfg) == (whole, True, False, 1)
    assert gatt._choose_reply(world, backspeak, [cut], cfg) == (cut, False, False, 0)
    assert gatt._choose_reply(world, backspeak, [cut, english], cfg) == (english, False, False, 0)  # finished context
    loose = gatt.GAttData(finished_only=False)
    assert gatt._choose_reply(world, backspeak, [cut, whole], loose) == (cut, True, False, 2)
    assert [gatt.finished(t) for t in ("Yes.", "I enjoy chess. 🌟", "King Koruze rules", "64 sunim", "")] == [
        True, True, False, False, False]


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
    dialogs = [json.loads(line)["messages"] for line in lines]
    assert report["training_dialogs"] == len(lines) > 0
    assert report["turns_accepted"] == sum(m.get("weight", 1) for d in dialogs for m in d if m["role"] == "assistant")
    # every other sample obeys; a set the obedient reply cannot satisfy (a word limit) is never accepted
    # one sample of each turn's two passes for a set the obedient reply satisfies, so the two rates differ
    assert report["replies_passing"] == report["turns_accepted"]
    assert report["acceptance_rate"] == pytest.approx(report["replies_passing"] / report["replies_sampled"])
    assert report["turn_acceptance_rate"] == pytest.approx(report["turns_accepted"] / report["turns_sampled"])
    assert 0 < report["acceptance_rate"] <= 0.5 and report["turn_acceptance_rate"] == 2 * report["acceptance_rate"]
    assert result.step >= 1 and model_dir(tmp_path / "gatt") == result.checkpoint / "model"
