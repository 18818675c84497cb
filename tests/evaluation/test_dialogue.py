import json

import pytest

from llama2 import ModelArgs, Tokenizer, Transformer
from llama2.cli import main
from llama2.data.toyworld import ToyWorld
from llama2.evaluation.dialogue import AdherenceSettings, adherence_by_turn, adherence_of_pools, opening_dialogs
from llama2.model.checkpoint import save_hf


@pytest.fixture(scope="module")
def world():
    return ToyWorld(0)


def test_held_out_dialogs_use_held_out_constraints(world):
    seen = opening_dialogs(world, 6, 4, held_out=False, seed=0)
    unseen = opening_dialogs(world, 6, 4, held_out=True, seed=0)
    assert all(not c.held_out for cs, _, _ in seen for c in cs)
    assert all(any(c.held_out for c in cs) for cs, _, _ in unseen)
    assert all(len(users) == 4 for _, _, users in seen)
    assert opening_dialogs(world, 6, 4, held_out=False, seed=0) == seen  # reproducible


class Scripted:
    """A chat model that obeys the system instruction for the first `good_turns` turns, then forgets it."""

    def __init__(self, world, tokenizer, good_turns):
        self.world, self.tokenizer, self.good_turns = world, tokenizer, good_turns
        self.args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=tokenizer.n_words, max_seq_len=100_000,
                              multiple_of=16)

    def chat_completion(self, dialogs, **kw):
        out = []
        for d in dialogs:
            turn = sum(m["role"] == "user" for m in d)
            constraints, _ = self.world.constraints.parse(d[0]["content"])
            text = "The river is long."
            if turn <= self.good_turns:
                text = self.world.constraints.apply(constraints, text)
            out.append({"generation": {"role": "assistant", "content": text}})
        return out


def test_adherence_curve_follows_the_replies(world, tiny_tokenizer_path):
    llm = Scripted(world, Tokenizer(tiny_tokenizer_path), good_turns=2)
    result = adherence_by_turn(llm, world, AdherenceSettings(dialogs=8, turns=4), held_out=False, progress=False)
    curve = result["adherence"]
    assert curve[0] == curve[1] > 0.5  # obeyed where `apply` satisfies the checker
    assert curve[2] == curve[3] == 0.0  # forgotten after turn 2
    assert result["dialogs_per_turn"] == [8, 8, 8, 8]
    by_kind = result["by_kind"]
    assert by_kind and all(0.0 <= v["all_turns"] <= v["turn_1"] for v in by_kind.values())
    assert sum(v["constraints"] for v in by_kind.values()) >= 8  # every dialog holds at least one constraint
    assert set(by_kind) <= {"hobby", "language", "figure", "uppercase", "emoji", "max_words", "one_sentence"}
    failures = result["failures"]  # every dialog forgets its instruction at turn 3, in both remaining turns
    assert len(failures) == 8 and all(f["first_turn"] == 3 and f["turns_failed"] == 2 for f in failures)
    assert all(f["reply"] == "The river is long." and f["broken"] for f in failures)


def test_both_pools_decode_in_one_batch_with_the_results_of_each_alone(world, tiny_tokenizer_path):
    llm = Scripted(world, Tokenizer(tiny_tokenizer_path), good_turns=2)
    batches = []
    record = llm.chat_completion
    llm.chat_completion = lambda dialogs, **kw: batches.append(len(dialogs)) or record(dialogs, **kw)
    settings = AdherenceSettings(dialogs=5, turns=3)
    both = adherence_of_pools(llm, world, settings, ("seen", "held_out"), progress=False)
    assert batches == [10, 10, 10]
    for pool in ("seen", "held_out"):
        assert both[pool] == adherence_by_turn(llm, world, settings, held_out=pool == "held_out", progress=False)
    assert both["seen"]["example"][0] != both["held_out"]["example"][0]


@pytest.mark.slow
def test_gatt_adherence_task_end_to_end(tmp_path, tiny_tokenizer_path):
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                  vocab_size=Tokenizer(tiny_tokenizer_path).n_words, multiple_of=16, max_seq_len=512))
    model.init_weights(seed=0)
    path = save_hf(model, tmp_path / "m", tokenizer_model=tiny_tokenizer_path)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(path), "--task", "gatt_adherence", "--limit", "2", "--option", "turns=2",
                 "--option", f"baseline={path}", "--out", str(out), "--json", str(out / "r.json")]) == 0
    result = json.loads((out / "r.json").read_text())["gatt_adherence"]
    assert set(result) == {"model", "baseline", "seconds"}
    assert len(result["model"]["seen"]["adherence"]) == 2
    assert result["model"] == result["baseline"]  # the same weights, greedy: the same curve
    assert (out / "gatt_adherence.png").stat().st_size > 1000
