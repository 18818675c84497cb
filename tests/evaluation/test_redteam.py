"""Red teaming: rates per category and vector, the share fixed since a baseline, and the CLI end to end."""

from __future__ import annotations

import json
import math

import pytest

from llama2 import ModelArgs, Tokenizer, Transformer
from llama2.cli import main
from llama2.data.formats import dumps
from llama2.data.toyworld import SAFE_THRESHOLD, ToyWorld
from llama2.evaluation import redteam
from llama2.model.checkpoint import save_hf

COMPLY = "Sure. Here is how: sneak in at night."
REFUSE = "I can't help with that because it would hurt other people. Instead, please ask an expert."


@pytest.fixture(scope="module")
def world():
    return ToyWorld(0)


@pytest.fixture(scope="module")
def prompt_file(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("redteam") / "eval_adversarial.jsonl"
    path.write_text("".join(dumps(p.to_dict()) + "\n" for p in world.eval_prompts("adversarial", 24, seed=0)))
    return path


class Scripted:
    """A stand-in chat model that complies with exactly the attacks of the given categories."""

    def __init__(self, world, unsafe_categories):
        self.world, self.unsafe = world, set(unsafe_categories)

    def chat_completion(self, dialogs, **kw):
        cats = [self.world.rules.classify(d[-1]["content"]).category for d in dialogs]
        return [{"generation": {"role": "assistant", "content": COMPLY if c in self.unsafe else REFUSE}}
                for c in cats]


def test_prompts_keep_their_file_meta_and_are_classified_without_it(world, prompt_file, tmp_path):
    prompts = redteam.load_redteam_prompts(prompt_file, world)
    records = [json.loads(line) for line in prompt_file.read_text().splitlines()]
    assert [(p.category, p.vector) for p in prompts] == [(r["meta"]["category"], r["meta"]["vector"])
                                                          for r in records]
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(dumps({"messages": r["messages"]}) + "\n" for r in records[:6]))
    assert [p.category for p in redteam.load_redteam_prompts(bare, world)] == [p.category for p in prompts[:6]]
    assert {p.category for p in redteam.load_redteam_prompts(bare)} == {"unknown"}


def test_rates_per_category_and_vector_and_share_fixed_since_baseline(world, prompt_file):
    prompts = redteam.load_redteam_prompts(prompt_file, world)
    settings = redteam.RedTeamSettings(batch_size=5)
    report = redteam.red_team(Scripted(world, {"hateful"}), prompts, redteam.oracle_judge(world), SAFE_THRESHOLD,
                              settings, baseline=Scripted(world, {"hateful", "illicit"}), judge_name="oracle")
    n = {c: sum(p.category == c for p in prompts) for c in ("illicit", "hateful", "advice")}
    assert all(n.values()), "the prompt set should hold every category"
    model = report["model"]
    assert {k: v["rate"] for k, v in model["by_category"].items()} == {"advice": 0.0, "hateful": 1.0, "illicit": 0.0}
    assert model["violation_rate"] == pytest.approx(n["hateful"] / len(prompts))
    for vector, row in model["by_vector"].items():
        hateful = sum(p.vector == vector and p.category == "hateful" for p in prompts)
        assert row["violations"] == hateful and row["prompts"] == sum(p.vector == vector for p in prompts)
    assert report["baseline"]["violations"] == n["hateful"] + n["illicit"]
    since = report["since_baseline"]
    assert since == {"baseline_violations": n["hateful"] + n["illicit"], "now_safe": n["illicit"],
                     "share_fixed": pytest.approx(n["illicit"] / (n["hateful"] + n["illicit"])),
                     "new_violations": 0}
    md = redteam.markdown(report)
    assert "| hateful |" in md and f"{since['now_safe']} (" in md


def test_fixed_since_baseline_counts_new_breaks():
    s = redteam.fixed_since_baseline([True, True, False, False], [False, True, True, False])
    assert s == {"baseline_violations": 2, "now_safe": 1, "share_fixed": 0.5, "new_violations": 1}
    assert math.isnan(redteam.fixed_since_baseline([False], [True])["share_fixed"])


def test_judge_spec_is_checked(world):
    with pytest.raises(ValueError, match="oracle"):
        redteam.judge_for("rm:", world, 4)


@pytest.mark.slow
def test_redteam_cli_on_a_tiny_random_model(prompt_file, tiny_tokenizer_path, tmp_path, capsys):
    tok = Tokenizer(tiny_tokenizer_path)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                  multiple_of=16, max_seq_len=256))
    model.init_weights(seed=0)
    path = save_hf(model, tmp_path / "model", tokenizer_model=tiny_tokenizer_path)
    out = tmp_path / "report"
    assert main(["redteam", "--model", str(path), "--prompts", str(prompt_file), "--baseline", str(path),
                 "--limit", "12", "--max-gen-len", "6", "--out", str(out)]) == 0
    report = json.loads((out / "redteam.json").read_text())
    # The 320-piece tokenizer makes some prompts longer than the 256-token context: those are left out.
    assert report["model"]["prompts"] == 12 - report["skipped_too_long"] == len(report["answers"]) > 0
    # Greedy answers of the same model: nothing the baseline failed on is fixed, nothing new breaks.
    assert report["since_baseline"]["now_safe"] == report["since_baseline"]["new_violations"] == 0
    assert report["model"]["violation_rate"] == report["baseline"]["violation_rate"]
    assert "risk category" in (out / "redteam.md").read_text() and "risk category" in capsys.readouterr().out
