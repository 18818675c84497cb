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


class ObedientSometimes:
    """Stands in for the chat model: obeys the instruction appended to the user turn on every other sample."""

    def __init__(self, world, tokenizer, max_seq_len=4096):
        self.world, self.tokenizer, self.calls = world, tokenizer, []
        self.args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=tokenizer.n_words, max_seq_len=max_seq_len,
                              multiple_of=16)

    def chat_completion(self, dialogs, **kw):
        self.calls.append(dialogs)
        out = []
        for k, d in enumerate(dialogs):
            constraints, rest = self.world.constraints.parse(d[-1]["content"])
            reply = self.world.constraints.apply(constraints, "The river is long.") if k % 2 else "No."
            out.append({"generation": {"role": "assistant", "content": reply}})
        return out


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
    # dialog whose reply fails ends at its first turn.
    passes = [world.check_constraint(c.constraints, world.constraints.apply(c.constraints, "The river is long."))
              for c in convs]
    assert [len(c.replies) for c in convs] == [len(c.users) if ok else 0 for c, ok in zip(convs, passes, strict=True)]
    assert stats["turns_accepted"] == sum(len(c.replies) for c in convs) > 0
    for c in convs:
        assert all(world.check_constraint(c.constraints, r) for r in c.replies)


def test_a_dialog_stops_at_its_first_turn_without_an_accepted_reply(world, tiny_tokenizer_path):
    class NeverObeys(ObedientSometimes):
        def chat_completion(self, dialogs, **kw):
            self.calls.append(dialogs)
            return [{"generation": {"role": "assistant", "content": "No."}} for _ in dialogs]

    cfg = gatt.GAttData(dialogs=2, min_turns=3, max_turns=3, samples_per_turn=2)
    convs = [gatt.Conversation(cs, t, u) for (cs, t), u in
             zip(gatt.sample_instructions(cfg, world, 2), gatt.user_turns(cfg, world), strict=True)]
    llm = NeverObeys(world, Tokenizer(tiny_tokenizer_path))
    assert gatt.sample_replies(llm, world, convs, cfg)["turns_accepted"] == 0
    assert len(llm.calls) == 1 and all(c.replies == [] for c in convs)


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
    assert report["acceptance_rate"] == pytest.approx(0.5)
    assert result.step >= 1 and model_dir(tmp_path / "gatt") == result.checkpoint / "model"
