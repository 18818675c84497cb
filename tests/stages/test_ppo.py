"""PPO stage: log-prob parity between generation and training, a tiny run that learns a known best answer,
exact resume after a kill mid-iteration, the warnings, and the presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama2 import ModelArgs, Tokenizer, Transformer
from llama2.config import load_config
from llama2.data.formats import dumps
from llama2.model.checkpoint import save_hf
from llama2.stages import ppo
from llama2.stages.artifacts import model_dir
from llama2.training.early_stopping import EarlyStopping
from llama2.training.parallel import init_distributed

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def setup(tmp_path, tiny_tokenizer_path):
    """(policy dir, prompts file, tokenizer): a random 2-layer model and 8 short prompts, 2 tagged safety."""
    tokenizer = Tokenizer(tiny_tokenizer_path)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words, multiple_of=16,
                     max_seq_len=128)
    model = Transformer(args)
    model.init_weights(seed=0)
    policy = save_hf(model, tmp_path / "policy", tokenizer_model=tiny_tokenizer_path)
    prompts = tmp_path / "prompts.jsonl"
    words = ["owls", "river", "capital", "song", "cat", "dog", "bird", "queen"]
    prompts.write_text("".join(
        dumps({"messages": [{"role": "user", "content": f"Tell me about the {w}."}],
               "meta": {"kind": "adversarial" if i < 2 else "helpful"}}) + "\n" for i, w in enumerate(words)))
    return policy, prompts, tokenizer


def target_scorer(parity: int) -> ppo.Scorer:
    """A toy reward with a known best answer: the fraction of response ids with this parity (even/odd), so
    a random policy starts near 0.5 and the best policy only ever samples such ids."""

    def score(prompts, texts, ids):
        return ppo.Scores(torch.tensor([sum(t % 2 == parity for t in r) / max(len(r), 1) for r in ids]), None)

    return score


def config(tmp_path: Path, policy: Path, prompts: Path, **ppo_fields) -> ppo.Config:
    hyper = {"iterations": 4, "batch_size": 8, "mini_batch_size": 4, "micro_batch_size": 2,
             "generation_batch_size": 8, "max_gen_len": 6, "beta": 0.01, **ppo_fields}
    return ppo.Config(out_dir=str(tmp_path / "run"), device="cpu", checkpoint_every=1,
                      models=ppo.Models(policy=str(policy)), prompts=ppo.Prompts(files=[str(prompts)]),
                      ppo=ppo.PPOHyper(**hyper), optim=ppo.Optim(lr=1e-3))


@pytest.mark.parametrize("value", ["shared", "separate"])
def test_generation_logprobs_equal_the_training_forward(setup, value):
    policy_dir, prompts_file, tokenizer = setup
    cfg = config(Path("."), policy_dir, prompts_file)
    cfg.models.value = value
    env = init_distributed("cpu")
    model, reference, tokenizer, _ = ppo._setup_models(cfg, env)
    prompts = ppo.read_prompts([str(prompts_file)], tokenizer, cfg.prompts)
    assert [p.is_safety for p in prompts] == [True, True] + [False] * 6
    rollout, texts = ppo.make_rollout(model, reference, prompts, tokenizer, target_scorer(5), cfg.ppo,
                                      torch.Generator().manual_seed(0))
    assert rollout.generation_parity <= 1e-5
    assert rollout.mask.sum() > len(prompts)  # real responses were sampled
    # before any update π_θ = π_0: the KL is exactly 0 and every reward is the score at the last token
    assert rollout.kl.abs().max() == 0
    torch.testing.assert_close(rollout.rewards.sum(1), rollout.score)
    assert rollout.tokens.shape[1] - 1 == rollout.mask.shape[1] == rollout.values.shape[1]


def test_bf16_rollouts_sample_from_a_copy_refreshed_in_place(setup, tmp_path):
    policy_dir, prompts_file, tokenizer = setup
    cfg = config(tmp_path, policy_dir, prompts_file, iterations=2)
    cfg.models.rollout_dtype = "bf16"
    cfg.checkpoint_every = 0
    ppo.run(cfg, scorer=target_scorer(0))
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2  # bf16 samples, fp32 trainer: off-policy by rounding only
    assert all(1e-5 < r["generation_logprob_max_diff"] < 0.5 for r in history)

    policy = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16))
    sampler = ppo._sampler(policy, "bf16")
    storage = [p.data_ptr() for p in sampler.parameters()]
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    ppo.refresh_sampler(sampler, policy)
    assert [p.data_ptr() for p in sampler.parameters()] == storage  # captured CUDA graphs stay valid
    for got, want in zip(sampler.parameters(), policy.parameters(), strict=True):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
    assert ppo._sampler(policy, "fp32") is None


@pytest.mark.slow
def test_tiny_ppo_learns_the_target_token(setup, tmp_path):
    policy_dir, prompts_file, tokenizer = setup
    cfg = config(tmp_path, policy_dir, prompts_file, iterations=10, batch_size=16, mini_batch_size=8,
                 micro_batch_size=8, generation_batch_size=16, epochs=2, beta=0.0)
    cfg.optim.lr = 1e-2
    cfg.checkpoint_every = 0
    result = ppo.run(cfg, scorer=target_scorer(0))
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 10 and result.iteration == 10
    start = sum(r["reward_helpfulness"] for r in history[:3]) / 3
    end = sum(r["reward_helpfulness"] for r in history[-3:]) / 3
    assert end > start + 0.15, (start, end)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["reward_start"] == history[0]["reward_combined"]
    assert summary["reward_end"] == history[-1]["reward_combined"]
    assert {"mean_kl", "kl_estimator", "reward_source"} <= set(summary)
    assert (tmp_path / "run" / "ppo_curves.png").stat().st_size > 0
    assert (model_dir(tmp_path / "run") / "config.json").is_file()
    for key in ("entropy", "clip_fraction", "value_loss", "approx_kl", "kl", "response_length",
                "reward_whitened_mean", "generation_logprob_max_diff"):
        assert key in history[-1]


def held_out_prompts(tmp_path: Path) -> Path:
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(dumps({"messages": [{"role": "user", "content": f"Describe the {w}."}],
                                   "meta": {"kind": "helpful"}}) + "\n" for w in ("owls", "river", "song")))
    return path


def train_only_scorer(parity: int) -> ppo.Scorer:
    """The parity reward on training prompts, a constant on the held-out ones ("Describe ..."): training
    moves the policy while its held-out reward never improves."""
    learn = target_scorer(parity)

    def score(prompts, texts, ids):
        if prompts[0].dialog[0]["content"].startswith("Describe"):
            return ppo.Scores(torch.full((len(prompts),), 0.5), None)
        return learn(prompts, texts, ids)

    return score


@pytest.mark.slow
def test_early_stopping_ends_on_the_start_when_the_held_out_reward_never_rises(setup, tmp_path):
    policy_dir, prompts_file, _ = setup
    cfg = config(tmp_path, policy_dir, prompts_file, iterations=8)
    cfg.optim.lr = 1e-2
    cfg.early_stopping = EarlyStopping(prompts=[str(held_out_prompts(tmp_path))], every=2, patience=2)
    result = ppo.run(cfg, scorer=train_only_scorer(0))
    assert result.iteration == 4  # evaluated at 0 (the best: a tie is no improvement), 2 and 4: stop
    evaluations = [json.loads(line) for line in (tmp_path / "run" / "early_stopping.jsonl").read_text().splitlines()]
    assert [(e["iteration"], e["best"]) for e in evaluations] == [(0, True), (2, False), (4, False)]
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("heldout_reward") for r in history] == [None, 0.5, None, 0.5]
    assert result.summary["early_stopping"] == {"best_iteration": 0, "best_reward": 0.5, "evaluations": 3,
                                                "stopped_early": True}
    start = load_file(str(policy_dir / "model.safetensors"))
    final = load_file(str(model_dir(tmp_path / "run") / "model.safetensors"))
    trained = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000003" / "model" / "model.safetensors"))
    assert not all(torch.equal(start[k], trained[k]) for k in start)
    assert all(torch.equal(start[k], final[k]) for k in start)  # trained, then given back as it came
    assert json.loads((result.checkpoint / "trainer.json").read_text())["policy_from"] == 0
    rerun = ppo.run(cfg, scorer=train_only_scorer(0))  # a finished run stays finished
    assert rerun.iteration == 4 and rerun.checkpoint == result.checkpoint


def test_scores_whitened_per_prompt_reward_beating_the_prompts_other_samples():
    # two prompts, two samples each: the first prompt's samples both score high, the second's both low
    combined = torch.tensor([0.9, 0.7, 0.3, 0.1])
    per_batch = ppo.score_reward(combined)
    assert per_batch[1] > 0 and per_batch[2] < 0  # over the batch, easy prompts' worse answers still gain
    per_prompt = ppo.score_reward(combined, group=2)
    torch.testing.assert_close(per_prompt, torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-6, rtol=0)
    # centred per prompt but scaled over the batch: a prompt with two near-equal scores stays near 0
    uneven = ppo.score_reward(torch.tensor([0.9, 0.1, 0.5, 0.501]), group=2)
    assert uneven[0] == pytest.approx(-uneven[1]) and abs(uneven[2]) < 0.01 < 1.0 < uneven[0]
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        ppo.Config(ppo=ppo.PPOHyper(batch_size=8, mini_batch_size=4, micro_batch_size=2, samples_per_prompt=3))
    with pytest.raises(ValueError, match="needs samples_per_prompt of 2"):
        ppo.Config(ppo=ppo.PPOHyper(batch_size=8, mini_batch_size=4, micro_batch_size=2, score_whitening="prompt"))


def test_each_prompt_of_an_iteration_is_sampled_k_times(setup, tmp_path):
    policy_dir, prompts_file, _ = setup
    cfg = config(tmp_path, policy_dir, prompts_file, iterations=2, samples_per_prompt=4, score_whitening="prompt")
    cfg.checkpoint_every = 0
    batches = []

    def recording(prompts, texts, ids):
        batches.append([p.dialog[-1]["content"] for p in prompts])
        return target_scorer(0)(prompts, texts, ids)

    ppo.run(cfg, scorer=recording)
    assert len(batches) == 2
    for batch in batches:  # 8 rollouts: 2 prompts, each in a run of 4 with its own samples
        assert len(batch) == 8 and len(set(batch[:4])) == len(set(batch[4:])) == 1 and batch[0] != batch[4]
    assert len({b[0] for b in batches} | {b[4] for b in batches}) == 4  # the next iteration draws new prompts


class Killed(Exception):
    pass


@pytest.mark.slow
def test_killed_mid_iteration_resumes_to_the_same_weights(setup, tmp_path, monkeypatch):
    policy_dir, prompts_file, _ = setup
    # with held-out evaluations after every iteration: they too replay exactly, and both runs end on the best
    stopping = EarlyStopping(prompts=[str(held_out_prompts(tmp_path))], every=1, patience=10)
    straight = config(tmp_path / "straight", policy_dir, prompts_file, kl_estimator="k3", iterations=3)
    straight.early_stopping = stopping
    ppo.run(straight, scorer=target_scorer(1))

    def kill(point: str, step: int) -> None:
        if (point, step) == ("mid_iteration", 3):
            raise Killed

    interrupted = config(tmp_path / "interrupted", policy_dir, prompts_file, kl_estimator="k3", iterations=3)
    straight.checkpoint_every = interrupted.checkpoint_every = 2  # killed in iteration 3, resumed from 2
    interrupted.early_stopping = stopping
    monkeypatch.setattr(ppo, "maybe_kill", kill)
    with pytest.raises(Killed):
        ppo.run(interrupted, scorer=target_scorer(1))
    monkeypatch.undo()
    torch.manual_seed(1234)  # a resumed process starts with other global RNG state; it must not matter
    result = ppo.run(interrupted, scorer=target_scorer(1))
    assert result.iteration == 3
    a = load_file(str(model_dir(tmp_path / "straight" / "run") / "model.safetensors"))
    b = load_file(str(model_dir(tmp_path / "interrupted" / "run") / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def lines(root: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(ln).items() if not k.startswith("seconds")}
                for ln in (root / "run" / "metrics.jsonl").read_text().splitlines()]

    assert lines(tmp_path / "straight") == lines(tmp_path / "interrupted")
    evaluations = [(root / "run" / "early_stopping.jsonl").read_text() for root in (tmp_path / "straight",
                                                                                   tmp_path / "interrupted")]
    assert evaluations[0] == evaluations[1] and len(evaluations[0].splitlines()) == 4


def test_warnings_flag_negative_kl_runaway_length_and_reward_hacking():
    h = ppo.PPOHyper(max_gen_len=10)
    calm = {"kl": 0.1, "response_length": 4.0, "truncated_fraction": 0.0}
    assert ppo.warnings_for(calm, [], h, window=4) == []
    assert "negative KL" in ppo.warnings_for({**calm, "kl": -0.2}, [], h, 4)[0]
    assert "runaway length" in ppo.warnings_for({**calm, "response_length": 9.5}, [], h, 4)[0]
    targeted = ppo.PPOHyper(max_gen_len=10, kl_target=0.5)
    assert ppo.warnings_for({**calm, "kl": 0.4}, [], targeted, 4) == []
    assert "above the target 0.5" in ppo.warnings_for({**calm, "kl": 0.6}, [], targeted, 4)[0]
    rm, oracle = "reward_helpfulness_on_helpful_prompts", "oracle_helpfulness_on_helpful_prompts"
    history = [{**calm, "oracle_combined": 0.5, rm: 0.1 * i, oracle: 0.5 - 0.1 * i} for i in range(3)]
    last = {**calm, "oracle_combined": 0.5, rm: 0.5, oracle: 0.1}
    hacked = [w for w in ppo.warnings_for(last, history, h, 4) if "reward hacking" in w]
    assert len(hacked) == 1 and "helpfulness_on_helpful_prompts" in hacked[0]
    honest = [{**r, oracle: r[rm]} for r in history]
    assert ppo.warnings_for({**last, oracle: 0.5}, honest, h, 4) == []
    # more safety prompts in later batches raise R_c and lower the oracle's batch mean, each kind unchanged
    mix = [{**calm, "reward_combined": 0.45 + 0.05 * i, "oracle_combined": 0.7 - 0.05 * i, rm: 0.44, oracle: 0.7,
            "reward_safety_on_safety_prompts": 0.8, "oracle_safety_on_safety_prompts": 0.48} for i in range(4)]
    assert ppo.warnings_for(mix[-1], mix[:-1], h, 4) == []


def test_summary_compares_the_first_and_last_eighth_of_the_iterations():
    history = [{"iteration": i + 1, "reward_combined": 0.1 * i, "kl": 0.01 * i, "response_length": 10.0}
               for i in range(16)]
    summary = ppo.summarize(history, ppo.Config())
    assert summary["summary_window"] == 2
    assert summary["reward_start"] == pytest.approx(0.05) and summary["reward_end"] == pytest.approx(1.45)
    assert summary["kl_end"] == pytest.approx(0.15) and summary["mean_kl"] == pytest.approx(0.075)


def test_each_kind_of_prompt_is_summarised_by_the_score_it_is_rewarded_with():
    helpfulness, safety = torch.tensor([0.2, 0.4, 0.9, 0.6]), torch.tensor([0.8, 0.1, 0.3, 0.7])
    tagged = torch.tensor([False, True, False, True])
    assert ppo.by_prompt_kind("reward", helpfulness, safety, tagged) == pytest.approx(
        {"reward_helpfulness_on_helpful_prompts": 0.55, "reward_safety_on_safety_prompts": 0.4})
    none_tagged = ppo.by_prompt_kind("oracle", helpfulness, safety, torch.zeros(4, dtype=torch.bool))
    assert none_tagged["oracle_safety_on_safety_prompts"] is None
    # a batch without safety prompts is left out of the start and end means, not counted as 0
    history = [{"iteration": i + 1, "reward_combined": 0.5, "kl": 0.0, "response_length": 10.0,
                "reward_helpfulness_on_helpful_prompts": 0.1 * i,
                "reward_safety_on_safety_prompts": None if i == 0 else 0.5} for i in range(8)]
    summary = ppo.summarize(history, ppo.Config())
    assert summary["reward_helpfulness_on_helpful_prompts_start"] == pytest.approx(0.0)
    assert summary["reward_helpfulness_on_helpful_prompts_end"] == pytest.approx(0.7)
    assert summary["reward_safety_on_safety_prompts_start"] is None
    assert summary["reward_safety_on_safety_prompts_end"] == pytest.approx(0.5)


@pytest.mark.parametrize("preset", ["smoke", "demo", "7b", "70b"])
def test_presets_load_and_name_their_launch_command(preset):
    path = REPO / "configs" / "ppo" / f"{preset}.yaml"
    assert path.read_text().startswith(f"# llama2 ppo --config configs/ppo/{preset}.yaml")
    cfg = load_config(ppo.Config, path)
    assert cfg.ppo.clip == 0.2 and cfg.ppo.kl_estimator in ("k1", "k2", "k3")
    if preset in ("7b", "70b"):
        assert (cfg.ppo.batch_size, cfg.ppo.mini_batch_size, cfg.optim.lr) == (512, 64, 1e-6)
        assert cfg.ppo.beta == {"7b": 0.01, "70b": 0.005}[preset]
        assert cfg.early_stopping.enabled  # SPEC §8: early stopping on held-out prompts
