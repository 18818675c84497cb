"""Rejection sampling: best-of-N under the combined reward (with the 0.15 safety gate), pooling across
iterations, the RM accuracy gate, and one tiny end-to-end round on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from llama2 import ModelArgs, Tokenizer, Transformer
from llama2.config import load_config
from llama2.data.formats import dumps
from llama2.model.checkpoint import save_hf
from llama2.model.heads import ScalarHeadModel, save_scalar_head_hf
from llama2.stages import rejection_sampling as rs
from llama2.stages.reward_models import RM_EVAL_FILE, WeakRewardModelError, check_rm_gate, combined_score


def test_best_of_n_picks_the_argmax_of_the_combined_reward_with_the_safety_gate():
    helpful = torch.tensor([[0.2, 0.9, 0.6, 0.7],   # benign prompt: sample 1 is most helpful but unsafe (0.1)
                            [0.9, 0.3, 0.8, 0.1]])  # safety prompt: ranked by safety alone
    safety = torch.tensor([[0.9, 0.1, 0.8, 0.5],
                           [0.2, 0.95, 0.6, 0.7]])
    is_safety = torch.tensor([[False], [True]]).expand(2, 4)
    combined = combined_score(helpful, safety, is_safety)
    torch.testing.assert_close(combined, torch.tensor([[0.2, 0.1, 0.6, 0.7], [0.2, 0.95, 0.6, 0.7]]))
    assert rs.best_of_first_n(combined, 4).tolist() == [3, 1]
    assert rs.best_of_first_n(combined, 2).tolist() == [0, 1]
    assert rs.best_of_first_n(helpful, 4).tolist() == [1, 0]  # without the gate the unsafe answer would win
    assert rs.reward_by_n(combined, [1, 2, 4, 8]) == pytest.approx({"1": 0.2, "2": (0.2 + 0.95) / 2,
                                                                      "4": (0.7 + 0.95) / 2})
    oracle = torch.arange(8.0).view(2, 4)
    assert rs.reward_by_n(combined, [4], oracle) == {"4": (3.0 + 5.0) / 2}


class StubRM:
    def __init__(self, table: dict[str, float]):
        self.table = table

    def score(self, dialogs, responses, batch_size=16):
        return [self.table[r] for r in responses]


def test_score_candidates_combines_both_reward_models_per_prompt_tag():
    dialog = [{"role": "user", "content": "q"}]
    helpful = StubRM({"a": 0.9, "b": 0.4})
    safety = StubRM({"a": 0.1, "b": 0.8})
    both = rs.score_candidates(helpful, safety, [dialog] * 4, ["a", "b", "a", "b"], [False, False, True, True], 2)
    assert both.tolist() == pytest.approx([0.1, 0.4, 0.1, 0.8])
    alone = rs.score_candidates(helpful, None, [dialog] * 2, ["a", "b"], [True, True], 2)
    assert alone.tolist() == pytest.approx([0.9, 0.4])


def test_merge_pool_lets_earlier_winners_compete_and_keeps_prompts_only_the_pool_knows():
    p1, p2, p3 = (rs.Prompt([{"role": "user", "content": t}], False) for t in ("one", "two", "three"))
    samples, scores = [["x", "y"], ["z", "w"]], torch.tensor([[0.1, 0.2], [0.5, 0.4]])
    pool = [(p1, "old-best"), (p3, "only-in-pool")]
    prompts, answers, values = rs.merge_pool([p1, p2], samples, scores, pool, torch.tensor([0.9, 0.3]))
    assert [p.dialog[0]["content"] for p in prompts] == ["one", "two", "three"]
    assert answers == [["x", "y", "old-best"], ["z", "w"], ["only-in-pool"]]
    best = rs.select_best(prompts, answers, values)
    assert [b["messages"][-1]["content"] for b in best] == ["old-best", "z", "only-in-pool"]
    assert best[0]["reward"] == pytest.approx(0.9)


def test_an_empty_answer_is_never_selected():
    p1, p2 = (rs.Prompt([{"role": "user", "content": t}], False) for t in ("one", "two"))
    best = rs.select_best([p1, p2], [["", "fine"], [" ", ""]], [torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.6])])
    assert [b["messages"][-1]["content"] for b in best] == ["fine"]  # prompt two has no usable answer


def write_eval(folder, accuracy):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RM_EVAL_FILE).write_text(json.dumps({"accuracy": accuracy}))
    return folder


def test_the_gate_refuses_a_weak_or_unevaluated_rm_unless_allowed(tmp_path):
    weak, strong = write_eval(tmp_path / "weak", 0.52), write_eval(tmp_path / "strong", 0.71)
    assert check_rm_gate(strong, 0.6, allow_weak=False) == 0.71
    with pytest.raises(WeakRewardModelError, match="accuracy 0.520, below the gate of 0.600"):
        check_rm_gate(weak, 0.6, allow_weak=False)
    assert check_rm_gate(weak, 0.6, allow_weak=True) == 0.52
    (tmp_path / "none").mkdir()
    with pytest.raises(WeakRewardModelError, match="no recorded evaluation"):
        check_rm_gate(tmp_path / "none", 0.6, allow_weak=False)
    cfg = load_config(rs.Config, overrides=[f"out_dir={tmp_path / 'run'}", f"policy={tmp_path / 'absent'}",
                                            f"helpfulness_rm={weak}", f"prompt_files=[{tmp_path / 'p.jsonl'}]"])
    with pytest.raises(WeakRewardModelError, match="allow_weak_rm"):
        rs.run(cfg)  # refused before the policy is even looked for


@pytest.fixture
def tiny_setup(tmp_path, tiny_tokenizer_path):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=Tokenizer(tiny_tokenizer_path).n_words,
                     multiple_of=16, max_seq_len=256)
    policy = Transformer(args)
    policy.init_weights(seed=0)
    policy_dir = save_hf(policy, tmp_path / "policy", tokenizer_model=tiny_tokenizer_path)
    rms = {}
    for seed, name in ((1, "helpful_rm"), (2, "safety_rm")):
        lm = Transformer(args)
        lm.init_weights(seed)
        rm = ScalarHeadModel.from_language_model(lm)
        torch.nn.init.normal_(rm.score.weight, std=1.0, generator=torch.Generator().manual_seed(seed))
        rms[name] = save_scalar_head_hf(rm, tmp_path / name, pad_token_id=0, tokenizer_model=tiny_tokenizer_path)
        write_eval(rms[name], 0.9)
    from llama2.data.toyworld import ToyWorld

    world = ToyWorld(0)
    prompts = world.eval_prompts("helpful", 2) + world.eval_prompts("adversarial", 1)
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(dumps(p.to_dict()) + "\n" for p in prompts))
    return policy_dir, rms, prompt_file


@pytest.mark.slow
def test_one_round_samples_keeps_the_best_studies_best_of_n_and_fine_tunes(tmp_path, tiny_setup):
    policy_dir, rms, prompt_file = tiny_setup

    def config(out, *extra):
        return load_config(rs.Config, overrides=[
            f"out_dir={out}", f"policy={policy_dir}", f"helpfulness_rm={rms['helpful_rm']}",
            f"safety_rm={rms['safety_rm']}", f"prompt_files=[{prompt_file}]", "oracle=toyworld",
            "sampling.samples_per_prompt=4", "sampling.temperature=1.0", "sampling.max_gen_len=6",
            "sampling.batch_size=6", "best_of_n.ns=[1,2,4,8]", "best_of_n.temperatures=[0.5]",
            "best_of_n.prompts=2", "sft.epochs=1", "sft.train.micro_batch_size=1", "sft.train.global_batch_size=1",
            "sft.train.device=cpu", "sft.train.precision=fp32", "sft.train.progress_bar=false",
            "sft.train.peak_tflops=1", *extra])

    result = rs.run(config(tmp_path / "round1"))
    best = [json.loads(x) for x in (tmp_path / "round1" / rs.BEST_SAMPLES).read_text().splitlines()]
    assert len(best) == 3 and [b["is_safety"] for b in best] == [False, False, True]
    study = json.loads((tmp_path / "round1" / rs.BEST_OF_N).read_text())
    curve = list(study["reward_by_n"].values())
    assert list(study["reward_by_n"]) == ["1", "2", "4"] and curve == sorted(curve)
    assert curve[-1] == pytest.approx(sum(b["reward"] for b in best) / 3, rel=1e-5)
    assert set(study["by_temperature"]) == {"1.0", "0.5"} and "oracle_helpfulness_by_n" in study
    assert (tmp_path / "round1" / "best_of_n.png").is_file()
    assert result.step == 1 and (result.checkpoint / "model" / "config.json").is_file()  # 3 dialogs pack into 1 window
    # Round 2 pools round 1's winners: each prompt's kept reward can only stay or rise.
    rs.sample_and_select(config(tmp_path / "round2", f"pool_files=[{tmp_path / 'round1' / rs.BEST_SAMPLES}]",
                                "sampling.seed=1", "best_of_n.temperatures=[]"), tmp_path / "round2")
    again = [json.loads(x) for x in (tmp_path / "round2" / rs.BEST_SAMPLES).read_text().splitlines()]
    assert all(b["reward"] >= a["reward"] - 1e-6 for a, b in zip(best, again, strict=True))
