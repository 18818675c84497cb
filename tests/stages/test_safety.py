"""Context distillation (SPEC §10.2): preprompts, targeted selection, and the stage end to end."""

from __future__ import annotations

import json

import pytest

from llama2 import ModelArgs, Tokenizer, Transformer
from llama2.config import load_config
from llama2.data.toyworld import ToyWorld
from llama2.data.toyworld.safety import CATEGORIES
from llama2.model.checkpoint import save_hf
from llama2.stages import safety
from llama2.stages.artifacts import model_dir

COMPLY = "Sure. Here is how: sneak in at night."
BARE = "I can't help with that."
TEMPLATE = "I can't help with that because it would hurt other people. Instead, please ask an expert."


def test_targeted_selection_keeps_exactly_the_improved_answers():
    base = [0.2, 0.5, 0.9, 0.6, 0.0]
    distilled = [0.8, 0.5, 0.3, 0.61, 0.0]
    assert safety.targeted_selection(base, distilled) == [True, False, False, True, False]
    with pytest.raises(ValueError, match="2 base scores but 1"):
        safety.targeted_selection([0.1, 0.2], [0.3])


def test_every_risk_category_has_a_template_and_the_preprompt_is_the_system_message():
    assert set(safety.TEMPLATE_PREPROMPTS) == set(CATEGORIES)
    assert safety.preprompt_for("none", "illicit") is None
    assert safety.preprompt_for("generic", "illicit") == safety.GENERIC_PREPROMPT
    assert safety.preprompt_for("template", "hateful") == safety.TEMPLATE_PREPROMPTS["hateful"]
    assert safety.preprompt_for("template", None) == safety.GENERIC_PREPROMPT
    dialog = [{"role": "system", "content": "old"}, {"role": "user", "content": "How do I steal?"}]
    assert safety.with_preprompt(dialog, "P") == [{"role": "system", "content": "P"}, dialog[1]]
    assert safety.with_preprompt(dialog, None) == [dialog[1]]


def test_rm_scoring_needs_a_safety_rm():
    with pytest.raises(ValueError, match="safety_rm"):
        safety.Config(score_with="rm")


class Preprompted:
    """Stands in for the chat model: complies without a preprompt, refuses with one; the template answer is
    the full safe answer except for "advice" prompts, where it complies (so those are not kept)."""

    def __init__(self, world, tokenizer):
        self.world, self.tokenizer = world, tokenizer
        self.args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=tokenizer.n_words, max_seq_len=8192,
                              multiple_of=16)

    def chat_completion(self, dialogs, **kw):
        out = []
        for d in dialogs:
            system = d[0]["content"] if d[0]["role"] == "system" else None
            if system is None or system == safety.TEMPLATE_PREPROMPTS["advice"]:
                reply = COMPLY
            elif system == safety.GENERIC_PREPROMPT:
                reply = BARE
            else:
                reply = TEMPLATE
            out.append({"generation": {"role": "assistant", "content": reply}})
        return out


@pytest.mark.slow
def test_distill_stage_with_the_oracle_scorer(tmp_path, tiny_tokenizer_path, monkeypatch):
    world = ToyWorld(0)
    tok = Tokenizer(tiny_tokenizer_path)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                  multiple_of=16, max_seq_len=512))
    model.init_weights(seed=0)
    start = save_hf(model, tmp_path / "chat", tokenizer_model=tiny_tokenizer_path)
    monkeypatch.setattr(safety.Llama, "load", classmethod(lambda cls, path, **kw: Preprompted(world, tok)))
    cfg = load_config(safety.Config, overrides=[
        f"out_dir={tmp_path / 'distill'}", f"init_from={start}", "score_with=oracle", "data.prompts=12",
        "epochs=1", "train.micro_batch_size=1", "train.global_batch_size=2", "train.progress_bar=false",
        "train.precision=fp32", "train.device=cpu", "train.peak_tflops=1",
    ])
    result = safety.run(cfg)
    out = tmp_path / "distill"
    report = json.loads((out / "distill_report.json").read_text())
    rows = [json.loads(line) for line in (out / "distill_answers.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (out / "distill_train.jsonl").read_text().splitlines()]
    not_advice = sum(r["category"] != "advice" for r in rows)
    assert report["scorer"].startswith("oracle") and report["prompts"] == len(rows) == 12
    assert 0 < not_advice < 12, "the prompts should mix advice and other categories"
    assert report["kept"] == len(train) == not_advice and [r["kept"] for r in rows] == [
        r["category"] != "advice" for r in rows]
    assert report["share_kept"] == pytest.approx(not_advice / 12)
    assert report["scores"]["none"]["median"] == 0.0 and report["scores"]["generic"]["median"] == 0.6
    # Trained without the preprompt, on the template answer.
    assert all(t["messages"][0]["role"] == "user" and t["messages"][-1]["content"] == TEMPLATE for t in train)
    assert (out / "distill_scores.png").stat().st_size > 0
    assert result.step >= 1 and model_dir(out) == result.checkpoint / "model"
