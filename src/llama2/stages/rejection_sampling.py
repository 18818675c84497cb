"""Rejection-sampling fine-tuning (SPEC §8): sample K answers per prompt, keep the reward models' favourite,
fine-tune on the kept answers through the SFT stage.

setup → loop → cleanup: check the reward models against the accuracy gate, sample K responses per prompt
with the KV-cache generator (batched, temperature 1.2-1.3 for a large RLHF model per Fig. 8), score them
with the helpfulness RM, or with both RMs combined as R_c (`reward_models.combined_score`: the safety score
for prompts tagged safety or scored below 0.15, else the helpfulness score), pool them with the best samples
of earlier iterations (rescored by today's RMs, so later rounds cannot forget, SPEC §8), write the winners
as chat jsonl (`best_samples.jsonl`) and run `llama2.stages.sft` on them. Along the way the best-of-N study
(Fig. 7/8 analogues) is computed from the same K samples: the mean reward of the best of the first N.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from llama2.data.formats import dumps, read_chat
from llama2.generation.generator import generate_texts
from llama2.generation.llama import Llama
from llama2.stages import sft
from llama2.stages.artifacts import model_dir
from llama2.stages.reward_models import RewardModel, check_rm_gate, combined_score, load_reward_model
from llama2.tokenizer.chat_format import Dialog, encode_dialog
from llama2.training.loop import TrainResult

BEST_SAMPLES = "best_samples.jsonl"
"""The kept samples, one chat dialog a line with its `reward`: the SFT data, and the pool of later rounds."""
BEST_OF_N = "best_of_n.json"
"""The best-of-N study: `reward_by_n` (N → mean best-of-N reward) and the same per temperature."""


@dataclass
class Sampling:
    """How the K candidates are drawn."""

    samples_per_prompt: int = 16
    """K, answers drawn per prompt (the paper studies 1-100; SPEC §13 suggests 4-8 for small runs)."""
    temperature: float = 1.2
    """Sampling temperature; SPEC §8: 1.2-1.3 is best for 10-100 samples from an RLHF model."""
    top_p: float = 1.0
    """Nucleus cut-off (1.0: plain temperature sampling, the breadth rejection sampling relies on)."""
    max_gen_len: int = 512
    """Longest answer in tokens."""
    batch_size: int = 64
    """Rows generated together: `batch_size // samples_per_prompt` prompts, each prefilled once for its samples."""
    seed: int = 0
    """Seed of the sampling generator."""


@dataclass
class BestOfNStudy:
    """The Fig. 7/8 analogue: reward of the best of N samples, for N up to K and across temperatures."""

    ns: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """N values (those above K are left out); best of the first N of the same K samples."""
    temperatures: list[float] = field(default_factory=list)
    """Extra temperatures to sample K answers at, for the temperature comparison (Fig. 8)."""
    prompts: int = 64
    """Prompts used for the extra temperatures (the first ones; 0: all)."""


@dataclass
class Config:
    """`llama2 rejection-sample`: a policy, reward models, prompts, sampling, and the SFT run on the winners."""

    out_dir: str = "runs/rejection_sampling"
    """Run directory: best_samples.jsonl, best_of_n.json/.png, and the fine-tune in `sft/`."""
    policy: str = ""
    """The model to sample from and fine-tune (model or run directory)."""
    helpfulness_rm: str = ""
    """Helpfulness reward model (HF sequence-classification or `llama2 reward` run directory)."""
    safety_rm: str = ""
    """Safety reward model; with it, samples are ranked by the combined R_c (empty: helpfulness only)."""
    prompt_files: list[str] = field(default_factory=list)
    """Chat jsonl of prompts (dialogs ending with a user turn); `meta` may tag safety prompts."""
    safety_kinds: list[str] = field(default_factory=lambda: ["adversarial"])
    """A prompt is IS_SAFETY when its `meta.kind` is listed here or its `meta.safety` is true."""
    pool_files: list[str] = field(default_factory=list)
    """best_samples.jsonl of earlier iterations: their answers compete again (rescored) with the new ones."""
    min_rm_accuracy: float = 0.6
    """Gate: refuse a reward model whose recorded held-out accuracy (rm_eval.json) is below this."""
    allow_weak_rm: bool = False
    """Use a reward model below the gate (or without a recorded evaluation) anyway, with a warning."""
    oracle: Literal["", "toyworld"] = ""
    """`toyworld`: add the oracle judges' scores of the best-of-N picks to the study."""
    world_seed: int = 0
    """Seed of the toy world behind the prompts (for the oracle)."""
    rm_batch_size: int = 32
    """Sequences per reward-model forward pass."""
    sampling: Sampling = field(default_factory=Sampling)
    """How the candidates are drawn."""
    best_of_n: BestOfNStudy = field(default_factory=BestOfNStudy)
    """The best-of-N study."""
    sft: sft.Config = field(default_factory=lambda: sft.Config(epochs=2.0))
    """The fine-tune on the kept samples; its `out_dir`, `init_from` and `data.train_files` are set by this
    stage (`<out_dir>/sft`, `policy`, best_samples.jsonl)."""


@dataclass
class Prompt:
    """One prompt dialog, whether it is a safety prompt, and a key that identifies it across iterations."""

    dialog: list[dict]
    is_safety: bool

    @property
    def key(self) -> str:
        return json.dumps(self.dialog, sort_keys=True, ensure_ascii=False)


def read_prompts(files: list[str], safety_kinds: list[str]) -> list[Prompt]:
    prompts = []
    for f in files:
        for r in read_chat(f, last_role="user"):
            meta = r.meta.get("meta", r.meta)
            prompts.append(Prompt(list(r.messages), meta.get("kind") in safety_kinds or meta.get("safety") is True))
    return prompts


def sample_responses(llm: Llama, prompts: list[Prompt], s: Sampling, temperature: float) -> list[list[str]]:
    """K answers per prompt (P lists of K strings), generated in batches of `s.batch_size` rows."""
    ids = [encode_dialog(llm.tokenizer, p.dialog) for p in prompts]
    gen = torch.Generator(llm.device).manual_seed(s.seed)
    texts = generate_texts(llm.model, llm.tokenizer, ids, s.max_gen_len, temperature, s.top_p, s.batch_size, gen,
                           samples_per_prompt=s.samples_per_prompt)
    k = s.samples_per_prompt
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def score_candidates(helpful_rm: RewardModel, safety_rm: RewardModel | None, dialogs: list[Dialog],
                     responses: list[str], is_safety: list[bool], batch_size: int) -> torch.Tensor:
    """One sigmoid-scale score per (dialog, response): R_c with both RMs, the helpfulness score otherwise."""
    helpful = torch.tensor(helpful_rm.score(dialogs, responses, batch_size))
    if safety_rm is None:
        return helpful
    safety = torch.tensor(safety_rm.score(dialogs, responses, batch_size))
    return combined_score(helpful, safety, torch.tensor(is_safety))


def best_of_first_n(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Index of the highest-scored of the first `n` samples of each prompt; `scores` (P, K) → (P,)."""
    return scores[:, :n].argmax(dim=1)


def reward_by_n(scores: torch.Tensor, ns: list[int], values: torch.Tensor | None = None) -> dict[str, float]:
    """N → mean over prompts of `values` (default: the scores themselves) at the best of the first N."""
    values = scores if values is None else values
    rows = torch.arange(scores.shape[0])
    return {str(n): values[rows, best_of_first_n(scores, n)].mean().item() for n in ns if n <= scores.shape[1]}


def read_pool(files: list[str]) -> list[tuple[Prompt, str]]:
    """(prompt, kept answer) of earlier iterations' best_samples.jsonl."""
    pool = []
    for f in files:
        for r in read_chat(f, last_role="assistant"):
            pool.append((Prompt(list(r.messages[:-1]), bool(r.meta.get("is_safety", False))),
                         r.messages[-1]["content"]))
    return pool


def merge_pool(prompts: list[Prompt], samples: list[list[str]], scores: torch.Tensor,
               pool: list[tuple[Prompt, str]], pool_scores: torch.Tensor
               ) -> tuple[list[Prompt], list[list[str]], list[torch.Tensor]]:
    """New samples plus pooled answers, grouped by prompt: (prompts, answers, scores), new prompts first and
    prompts only the pool knows after them."""
    index = {p.key: i for i, p in enumerate(prompts)}
    merged, answers, values = list(prompts), [list(row) for row in samples], list(scores)
    for (p, answer), score in zip(pool, pool_scores, strict=True):
        i = index.setdefault(p.key, len(merged))
        if i == len(merged):
            merged.append(p)
            answers.append([])
            values.append(torch.empty(0))
        answers[i].append(answer)
        values[i] = torch.cat([values[i], score.view(1)])
    return merged, answers, values


def select_best(prompts: list[Prompt], candidates: list[list[str]], scores: list[torch.Tensor]) -> list[dict]:
    """The highest-scored non-empty answer of each prompt as a chat record with its reward (an empty answer
    is no demonstration; a prompt whose answers are all empty is left out)."""
    records = []
    for p, answers, s in zip(prompts, candidates, scores, strict=True):
        usable = torch.tensor([bool(a.strip()) for a in answers])
        if not usable.any():
            continue
        i = int(s.masked_fill(~usable, float("-inf")).argmax())
        records.append({"messages": p.dialog + [{"role": "assistant", "content": answers[i]}],
                        "reward": float(s[i]), "is_safety": p.is_safety})
    return records


def oracle_scores(world, prompts: list[Prompt], samples: list[list[str]]) -> dict[str, torch.Tensor]:
    """The toy world's helpfulness and safety judges on every sample: each (P, K)."""
    return {kind: torch.tensor([[getattr(world, kind)(p.dialog, a) for a in row]
                                for p, row in zip(prompts, samples, strict=True)])
            for kind in ("helpfulness", "safety")}


def study(scores: torch.Tensor, ns: list[int], oracle: dict[str, torch.Tensor] | None) -> dict[str, dict]:
    out = {"reward_by_n": reward_by_n(scores, ns)}
    for kind, values in (oracle or {}).items():
        out[f"oracle_{kind}_by_n"] = reward_by_n(scores, ns, values)
    return out


def plot_best_of_n(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [k for k in ("reward_by_n", "oracle_helpfulness_by_n", "oracle_safety_by_n") if k in result]
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
    for ax, key in zip(axes[0], curves, strict=True):
        for temp, res in result["by_temperature"].items():
            ax.plot([int(n) for n in res[key]], list(res[key].values()), marker="o", label=f"T={temp}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N samples")
        ax.set_title(key.removesuffix("_by_n").replace("_", " "), fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_and_select(cfg: Config, out: Path) -> dict:
    """Steps 2-5 of `run`: writes best_samples.jsonl, best_of_n.json and .png; returns the study."""
    out.mkdir(parents=True, exist_ok=True)
    # 2. the policy, the reward models and the prompts
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = Llama.load(model_dir(cfg.policy), device=device)
    helpful_rm = load_reward_model(cfg.helpfulness_rm, device)
    safety_rm = load_reward_model(cfg.safety_rm, device) if cfg.safety_rm else None
    prompts = read_prompts(cfg.prompt_files, cfg.safety_kinds)
    room = llm.args.max_seq_len - cfg.sampling.max_gen_len
    fitting = [p for p in prompts if len(encode_dialog(llm.tokenizer, p.dialog)) <= room]
    if len(fitting) < len(prompts):
        print(f"rejection-sample: {len(prompts) - len(fitting)} prompt(s) longer than the context minus "
              f"max_gen_len ({room} tokens) are left out", file=sys.stderr)
    if not fitting:
        raise ValueError(f"rejection-sample: no prompt fits in {room} tokens (context minus max_gen_len)")
    prompts = fitting
    world = None
    if cfg.oracle == "toyworld":
        from llama2.data.toyworld import ToyWorld

        world = ToyWorld(cfg.world_seed)

    def score_flat(pairs: list[tuple[Prompt, str]]) -> torch.Tensor:  # (len(pairs),)
        return score_candidates(helpful_rm, safety_rm, [p.dialog for p, _ in pairs], [a for _, a in pairs],
                                [p.is_safety for p, _ in pairs], cfg.rm_batch_size)

    def scored(ps: list[Prompt], samples: list[list[str]]) -> torch.Tensor:  # (P, K)
        return score_flat([(p, a) for p, row in zip(ps, samples, strict=True) for a in row]).view(len(ps), -1)

    # 3. K samples per prompt at the configured temperature, scored
    samples = sample_responses(llm, prompts, cfg.sampling, cfg.sampling.temperature)
    scores = scored(prompts, samples)
    # 4. pool with earlier iterations' winners (rescored by these RMs) and keep each prompt's best
    pool = read_pool(cfg.pool_files)
    pool_scores = score_flat(pool) if pool else torch.empty(0)
    best = select_best(*merge_pool(prompts, samples, scores, pool, pool_scores))
    (out / BEST_SAMPLES).write_text("".join(dumps(r) + "\n" for r in best))
    # 5. the best-of-N study from the same samples, plus the extra temperatures on a prompt subset
    subset = prompts[: cfg.best_of_n.prompts or len(prompts)]
    oracle = oracle_scores(world, prompts, samples) if world else None
    result = {"samples_per_prompt": cfg.sampling.samples_per_prompt, "prompts": len(prompts),
              "temperature": cfg.sampling.temperature, **study(scores, cfg.best_of_n.ns, oracle),
              "by_temperature": {}}
    n_sub = len(subset)
    result["by_temperature"][str(cfg.sampling.temperature)] = study(
        scores[:n_sub], cfg.best_of_n.ns, {k: v[:n_sub] for k, v in oracle.items()} if oracle else None)
    for temp in cfg.best_of_n.temperatures:
        extra_samples = sample_responses(llm, subset, cfg.sampling, temp)
        result["by_temperature"][str(temp)] = study(
            scored(subset, extra_samples), cfg.best_of_n.ns,
            oracle_scores(world, subset, extra_samples) if world else None)
    (out / BEST_OF_N).write_text(json.dumps(result, indent=2) + "\n")
    plot_best_of_n(result, out / "best_of_n.png")
    print(f"rejection-sample: {len(prompts)} prompts × {cfg.sampling.samples_per_prompt} samples; best-of-N "
          f"reward {result['reward_by_n']}; {len(best)} kept in {out / BEST_SAMPLES}", file=sys.stderr)
    return result


def run(cfg: Config) -> TrainResult:
    """Gate the reward models, sample and keep the best (`sample_and_select`), fine-tune on the kept samples."""
    started = time.perf_counter()
    if not (cfg.policy and cfg.helpfulness_rm and cfg.prompt_files):
        raise ValueError("rejection-sample: policy, helpfulness_rm and prompt_files are required")
    out = Path(cfg.out_dir)
    # 1. refuse weak reward models before any sampling
    for path in filter(None, (cfg.helpfulness_rm, cfg.safety_rm)):
        accuracy = check_rm_gate(path, cfg.min_rm_accuracy, cfg.allow_weak_rm)
        if accuracy is None or accuracy < cfg.min_rm_accuracy:
            print(f"rejection-sample: warning: using reward model {path} below the gate (accuracy {accuracy}) "
                  "because allow_weak_rm is set", file=sys.stderr)
    # 2.-5. sample, score, pool, keep the best, best-of-N study (models are freed on return)
    sample_and_select(cfg, out)
    # 6. fine-tune on the kept samples through the SFT stage
    sft_cfg = replace(cfg.sft, out_dir=str(out / "sft"), init_from=cfg.policy,
                      data=replace(cfg.sft.data, train_files=[str(out / BEST_SAMPLES)]))
    train = sft.run(sft_cfg)
    print(f"rejection-sample: done in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return train
