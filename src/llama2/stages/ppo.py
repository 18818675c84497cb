"""PPO with Llama 2's safety-gated reward (SPEC §8): `llama2 ppo --config FILE`.

setup → loop → cleanup. Setup loads the policy, a frozen copy of it as the reference π_0 (reloaded from
`models.policy` on resume, so π_0 is always the policy at PPO start), the value function and the scorer
(helpfulness and/or safety RM, or the toy world's oracle judges for a clearly labelled sanity run). Each
iteration is six small steps:

    1. generate  a response per prompt (K per prompt with `ppo.samples_per_prompt`) with the batched KV-cache
                 generator (log-probs recorded)
    2. score     R_c = R_s if the prompt is tagged safety or R_s < 0.15 else R_h (`combined_score`)
    3. forward   log-probs of π_θ and π_0, values and entropy on the sampled tokens (no grad)
    4. rewards   WHITEN(LOGIT(R_c)) over the batch (or centred per prompt) at the last response token
                 − β·KL(π_θ‖π_0) per token
    5. GAE       advantages and returns (γ, λ)
    6. update    PPO epochs: shuffled mini-batches, one clipped-objective AdamW step each

then metrics (`metrics.jsonl`), warnings (negative KL, runaway length, reward up while the oracle falls) and,
at iteration boundaries, an atomic checkpoint (weights, optimizer, RNG, iteration) to resume from exactly.
The end writes `summary.json` (`mean_kl`, `reward_start`, `reward_end`, oracle start/end) and
`ppo_curves.png`.

The value function is configurable (`models.value`):
  * `separate` (the paper's lineage: Stiennon et al. and InstructGPT use a separate value model initialised
    from the reward model): a `ScalarHeadModel` read at every token, initialised from the helpfulness RM
    when there is one (it already knows what scores well), else from the policy with a zero head. Policy
    and value never share gradients, at the price of a second trained model (2× trained memory).
  * `shared`: a zero-initialised linear head on the policy's final hidden states. One trunk, one forward
    pass, almost no extra memory: what fits a 7B PPO on one 80 GB GPU (docs/ppo.md). The value loss
    (× `vf_coef`) then also moves the trunk.
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import nn

from llama2.config import dump_config
from llama2.data.formats import read_chat
from llama2.generation.generator import generate
from llama2.generation.llama import find_tokenizer
from llama2.model.checkpoint import load_checkpoint as load_model
from llama2.model.heads import ScalarHeadModel, load_scalar_head
from llama2.model.transformer import Transformer
from llama2.stages.artifacts import model_dir
from llama2.stages.export import hf_exporter
from llama2.stages.reward_models import RewardModel, check_rm_gate, combined_score, load_reward_model
from llama2.tokenizer.chat_format import encode_dialog
from llama2.tokenizer.tokenizer import Tokenizer
from llama2.training.checkpointing import find_resume_point, load_checkpoint, save_checkpoint, truncate_log
from llama2.training.early_stopping import EarlyStopper, EarlyStopping
from llama2.training.faults import maybe_kill
from llama2.training.loop import TrainConfig, build_optimizer
from llama2.training.parallel import DistEnv, distributed_run
from llama2.training.ppo_losses import (
    KLEstimator,
    entropy,
    gae,
    gather_logprobs,
    kl_penalty,
    logit,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)

SUMMARY = "summary.json"
CURVES = "ppo_curves.png"
PAD_ID = 0
"""Fills rows after their end; causal attention means it never changes a real position's output."""


# --- config ------------------------------------------------------------------------------------------------


@dataclass
class Models:
    """Which models PPO reads, and how the frozen ones are held."""

    policy: str = ""
    """The starting policy (rejection-sampling or SFT output): a model directory or a run directory."""
    helpfulness_rm: str = ""
    """Helpfulness RM (model or `llama2 reward` run directory); empty: none."""
    safety_rm: str = ""
    """Safety RM; with both, the reward is SPEC §8's R_c; with one, that RM's score alone."""
    reward_source: Literal["rm", "oracle"] = "rm"
    """`rm`: the reward models above. `oracle`: the toy world's judges as R_h and R_s, a sanity run only
    (it is written into summary.json as `reward_source: oracle`)."""
    toyworld_seed: int | None = None
    """The toy world the prompts come from: enables oracle scores in the metrics (and `reward_source: oracle`)."""
    value: Literal["separate", "shared"] = "shared"
    """Value function: a separate scalar-head model, or a head on the policy trunk (see the module doc)."""
    reference_dtype: Literal["fp32", "bf16"] = "fp32"
    """π_0's weights; bf16 halves its memory but its log-probs (hence the KL) then carry bf16 rounding."""
    rollout_dtype: Literal["fp32", "bf16"] = "fp32"
    """Weights the responses are sampled with. bf16 samples from a bf16 copy of the policy refreshed in place
    before each iteration (decoding reads half the bytes: about 2x faster on a GPU); the ratio's old log-probs
    are still the fp32 policy's, recomputed by the trainer, so the samples are off-policy by bf16 rounding,
    which `generation_logprob_max_diff` then measures (it is ≤ 1e-5 with fp32 rollouts)."""
    rm_dtype: Literal["fp32", "bf16"] = "fp32"
    """The reward models' weights (they only score, so bf16 is usually fine at scale)."""
    min_rm_accuracy: float = 0.6
    """Refuse an RM whose recorded held-out accuracy (rm_eval.json) is below this."""
    allow_weak_rm: bool = False
    """Use an RM below the gate (or without a recorded evaluation) anyway, with a warning."""


@dataclass
class Prompts:
    """The prompts rollouts are generated for (`ppo.samples_per_prompt` responses each per iteration)."""

    files: list[str] = field(default_factory=list)
    """Chat jsonl, each dialog ending with a user turn (e.g. the toy world's eval_*.jsonl)."""
    safety_kinds: list[str] = field(default_factory=lambda: ["adversarial"])
    """`meta.kind` values tagged IS_SAFETY(p); a record's `meta.safety: true` also tags it."""
    max_prompt_len: int = 512
    """Prompts longer than this many tokens are left out (reported)."""
    seed: int = 0
    """Seed of the prompt order (a fresh permutation each pass) and of sampling and mini-batch shuffles."""


@dataclass
class PPOHyper:
    """The algorithm's settings (defaults: SPEC §8 at scale where the paper gives them)."""

    iterations: int = 200
    """PPO iterations (SPEC §8: 200-400 with early stopping on held-out prompts)."""
    batch_size: int = 512
    """Rollouts per iteration (SPEC §8: 512); the whitening statistics are taken over them."""
    mini_batch_size: int = 64
    """Rollouts per gradient step (SPEC §8: 64, one step per mini-batch)."""
    micro_batch_size: int = 8
    """Rollouts per forward pass; a mini-batch accumulates its micro-batches' gradients."""
    generation_batch_size: int = 64
    """Rollouts generated together (KV cache memory grows with it)."""
    epochs: int = 1
    """Passes over the iteration's rollouts (not in the paper; 1 keeps the update close to on-policy)."""
    clip: float = 0.2
    """PPO ratio clip ε (SPEC §8: 0.2)."""
    value_clip: float = 0.2
    """Clip of the value update around its rollout-time estimate."""
    vf_coef: float = 0.1
    """Weight of the value loss in the summed loss (matters only for the shared head)."""
    gamma: float = 1.0
    """GAE discount γ (not in the paper; 1: the score at the end counts fully for every token)."""
    lam: float = 0.95
    """GAE λ (not in the paper; 0.95 is the usual bias/variance trade-off)."""
    beta: float = 0.01
    """KL penalty β (SPEC §8: 0.01 for 7B/13B, 0.005 for 34B/70B)."""
    kl_estimator: KLEstimator = "k1"
    """Per-token KL estimator charged in the reward and logged as `kl`: k1 = log r, k2 = ½(log r)², k3."""
    kl_target: float | None = None
    """Sequence-level KL to π_0 the run should stay under (not in the paper): an iteration above it logs a
    warning, and summary.json records the last iteration's KL against it. None: no target."""
    samples_per_prompt: int = 1
    """Responses sampled for each prompt of an iteration (K; the paper samples one): the batch holds
    batch_size / K prompts, each K times over."""
    score_whitening: Literal["batch", "prompt"] = "batch"
    """What WHITEN's mean is taken over. `batch`: the iteration's rollouts. `prompt` (needs K ≥ 2): each
    prompt's K responses, so a response is rewarded for beating its siblings rather than for its prompt being
    easy to score well on; the centred scores are then divided by their std over the batch (not per prompt,
    which would blow K near-equal scores up to ±1)."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch's response tokens before the update."""
    max_gen_len: int = 256
    """Longest response in tokens (a response cut here ends without EOS: counted as truncated)."""
    temperature: float = 1.0
    """Sampling temperature. Keep 1: the log-probs (and so PPO's ratio) are of the policy at temperature 1."""
    top_p: float = 1.0
    """Nucleus cut-off; keep 1 for the same reason."""


@dataclass
class Optim:
    """AdamW for policy (and value); the rate is constant (SPEC §8)."""

    lr: float = 1e-6
    """Constant learning rate (SPEC §8: 1e-6)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.95
    """AdamW β2."""
    eps: float = 1e-5
    """AdamW ε."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices only (as `build_optimizer` does for every stage)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm of each step to this (0: off)."""


@dataclass
class Config:
    """`llama2 ppo`: models, prompts, PPO settings, optimizer, and the run's bookkeeping."""

    out_dir: str = "runs/ppo"
    """Run directory: metrics.jsonl, summary.json, ppo_curves.png, checkpoints. Re-running resumes."""
    models: Models = field(default_factory=Models)
    """The policy, the reward models and the value function."""
    prompts: Prompts = field(default_factory=Prompts)
    """The prompt files."""
    ppo: PPOHyper = field(default_factory=PPOHyper)
    """The algorithm."""
    optim: Optim = field(default_factory=Optim)
    """The optimizer."""
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    """Early stopping on held-out prompts (SPEC §8); off unless `early_stopping.prompts` names files. The
    run then ends on the policy with the best held-out reward, the starting one included."""
    device: str = "auto"
    """`auto` (CUDA if available), `cpu` or `cuda`."""
    seed: int = 0
    """Seeds python, numpy and torch at the start of a fresh run."""
    checkpoint_every: int = 10
    """Checkpoint every this many iterations (and always at the end); 0: only at the end."""
    keep_checkpoints: int = 2
    """Keep this many newest checkpoints."""
    hacking_window: int = 10
    """Iterations compared for the reward-hacking warning (first half vs second half of the window)."""

    def __post_init__(self) -> None:
        p = self.ppo
        if p.batch_size < 2:
            raise ValueError("ppo.batch_size must be at least 2: scores are whitened over the batch")
        if p.batch_size % p.mini_batch_size or p.mini_batch_size % p.micro_batch_size:
            raise ValueError(f"ppo.batch_size ({p.batch_size}) must be a multiple of mini_batch_size "
                             f"({p.mini_batch_size}), and that of micro_batch_size ({p.micro_batch_size})")
        if p.samples_per_prompt < 1 or p.batch_size % p.samples_per_prompt:
            raise ValueError(f"ppo.batch_size ({p.batch_size}) must be a multiple of samples_per_prompt "
                             f"({p.samples_per_prompt})")
        if p.score_whitening == "prompt" and p.samples_per_prompt < 2:
            raise ValueError("ppo.score_whitening: prompt needs samples_per_prompt of 2 or more")


# --- rollouts ----------------------------------------------------------------------------------------------


class Prompt(NamedTuple):
    dialog: list[dict]
    """The prompt dialog, ending with a user turn."""
    is_safety: bool
    """IS_SAFETY(p): tagged as possibly eliciting unsafe output."""
    ids: list[int]
    """`encode_dialog` of the dialog: what the policy is prompted with."""


class Scores(NamedTuple):
    """Sigmoid-scale scores of a batch of responses, (B,) each; None where that judge is not used."""

    helpfulness: torch.Tensor | None
    safety: torch.Tensor | None


Scorer = Callable[[Sequence[Prompt], Sequence[str], Sequence[Sequence[int]]], Scores]
"""(prompts, response texts, response ids) → Scores: RMs, the oracle judges, or a test's reward."""


class Rollout(NamedTuple):
    """One iteration's batch of B rollouts, right-padded to T tokens (prompt + response).

    Per-token tensors are (B, T−1) by *action position*: index j is the prediction of token j+1 from the
    logits at j (`ppo_losses` module doc), so `mask[b, j]` is True iff `tokens[b, j+1]` is a response token.
    """

    tokens: torch.Tensor
    """(B, T) long: prompt ids, response ids (EOS included when the response stopped), then PAD_ID."""
    mask: torch.Tensor
    """(B, T−1) bool: action positions that produced a response token."""
    response_lengths: torch.Tensor
    """(B,) long: response tokens per row, EOS included."""
    truncated: torch.Tensor
    """(B,) bool: the response hit `max_gen_len` without EOS."""
    is_safety: torch.Tensor
    """(B,) bool: IS_SAFETY(p) of each prompt."""
    helpfulness: torch.Tensor
    """(B,) fp32 sigmoid-scale helpfulness score (NaN when no helpfulness judge)."""
    safety: torch.Tensor
    """(B,) fp32 sigmoid-scale safety score (NaN when no safety judge)."""
    combined: torch.Tensor
    """(B,) fp32 R_c on the sigmoid scale."""
    score: torch.Tensor
    """(B,) fp32 WHITEN(LOGIT(R_c)) over the batch: the score reward at the last response token."""
    logprobs: torch.Tensor
    """(B, T−1) fp32 log π_θ(token) at rollout time (recomputed by the training forward; 0 off-mask)."""
    ref_logprobs: torch.Tensor
    """(B, T−1) fp32 log π_0(token)."""
    values: torch.Tensor
    """(B, T−1) fp32 V(state before the token) at rollout time."""
    entropy: torch.Tensor
    """(B, T−1) fp32 entropy of π_θ at each position."""
    kl: torch.Tensor
    """(B, T−1) fp32 per-token KL estimate (`ppo.kl_estimator`), 0 off-mask."""
    rewards: torch.Tensor
    """(B, T−1) fp32 −β·kl, plus `score` at the last response token."""
    advantages: torch.Tensor
    """(B, T−1) fp32 GAE advantages (whitened over response tokens if configured)."""
    returns: torch.Tensor
    """(B, T−1) fp32 value targets, advantages + values before whitening."""
    generation_parity: float
    """max |generator log-prob − recomputed log-prob| over the sampled (non-EOS) tokens."""
    seconds_generation: float
    """Wall time of step 1 (sampling the responses), to split an iteration into generation and training."""


class ActorCritic(nn.Module):
    """The trained modules: the policy and its value function (a separate scalar-head model or a head)."""

    def __init__(self, policy: Transformer, value_model: ScalarHeadModel | None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.value_head = None
        if value_model is None:
            self.value_head = nn.Linear(policy.args.dim, 1, bias=False, device=policy.output.weight.device)
            nn.init.zeros_(self.value_head.weight)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T) → (fp32 logits (B, T, V), fp32 values (B, T))."""
        h = self.policy.hidden_states(tokens)
        logits = self.policy.output(h).float()
        if self.value_model is None:
            values = self.value_head(h)
        else:
            values = self.value_model.score(self.value_model.trunk.hidden_states(tokens))
        return logits, values.squeeze(-1).float()


def read_prompts(files: Sequence[str], tokenizer: Tokenizer, p: Prompts) -> list[Prompt]:
    prompts, too_long = [], 0
    for f in files:
        for record in read_chat(f, last_role="user"):
            meta = record.meta.get("meta", record.meta)
            ids = encode_dialog(tokenizer, record.messages)
            if len(ids) > p.max_prompt_len:
                too_long += 1
                continue
            tagged = meta.get("kind") in p.safety_kinds or meta.get("safety") is True
            prompts.append(Prompt(list(record.messages), tagged, ids))
    if too_long:
        print(f"ppo: {too_long} prompt(s) longer than {p.max_prompt_len} tokens left out", file=sys.stderr)
    if not prompts:
        raise ValueError(f"ppo: no usable prompts in {list(files)}")
    return prompts


def prompt_indices(n: int, batch: int, iteration: int, seed: int) -> list[int]:
    """The prompts of `iteration`: consecutive slots of a fresh seeded permutation per pass over the n
    prompts. A pure function of the iteration, so a resumed run draws exactly the same prompts."""
    out = []
    for slot in range(iteration * batch, (iteration + 1) * batch):
        perm = list(range(n))
        random.Random(f"ppo-prompts-{seed}-{slot // n}").shuffle(perm)
        out.append(perm[slot % n])
    return out


def _generator(seed: int, iteration: int, purpose: str, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, iteration, purpose): sampling and shuffles replay exactly on resume."""
    salt = {"sample": 1, "shuffle": 2, "heldout": 3}[purpose]
    return torch.Generator(device).manual_seed((seed * 1_000_003 + iteration) * 4 + salt)


# step 1 ----------------------------------------------------------------------------------------------------


def generate_responses(policy: Transformer, prompts: Sequence[Prompt], eos_id: int, h: PPOHyper,
                       generator: torch.Generator) -> tuple[list[list[int]], list[list[float]], list[bool]]:
    """One response per prompt row (a prompt sampled K times fills K rows) → (response ids without EOS, their
    generator log-probs, truncated flags)."""
    ids, logprobs = [], []
    was_training = policy.training
    policy.eval()
    try:
        for start in range(0, len(prompts), h.generation_batch_size):
            chunk = [p.ids for p in prompts[start : start + h.generation_batch_size]]
            out = generate(policy, chunk, h.max_gen_len, [eos_id], h.temperature, h.top_p, logprobs=True,
                           generator=generator)
            ids += out.tokens
            logprobs += out.logprobs
    finally:
        policy.train(was_training)
    return ids, logprobs, [len(r) >= h.max_gen_len for r in ids]


def pack_rollouts(prompts: Sequence[Prompt], responses: Sequence[Sequence[int]], truncated: Sequence[bool],
                  eos_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (B, T), mask (B, T−1), response lengths (B,)): prompt + response (+ EOS if it stopped)."""
    rows = [list(p.ids) + list(r) + ([] if cut else [eos_id])
            for p, r, cut in zip(prompts, responses, truncated, strict=True)]
    width = max(map(len, rows))
    tokens = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for b, (p, row) in enumerate(zip(prompts, rows, strict=True)):
        tokens[b, : len(row)] = torch.tensor(row)
        mask[b, len(p.ids) - 1 : len(row) - 1] = True
    return tokens, mask, mask.sum(1)


# step 2 ----------------------------------------------------------------------------------------------------


def rm_scorer(helpful: RewardModel | None, safe: RewardModel | None, batch_size: int) -> Scorer:
    def score(prompts: Sequence[Prompt], texts: Sequence[str], ids: Sequence[Sequence[int]]) -> Scores:
        dialogs = [p.dialog for p in prompts]
        h = torch.tensor(helpful.score(dialogs, texts, batch_size)) if helpful else None
        s = torch.tensor(safe.score(dialogs, texts, batch_size)) if safe else None
        return Scores(h, s)

    return score


def oracle_scorer(world) -> Scorer:
    """The toy world's judges as R_h and R_s (both in [0, 1]): for sanity runs and for the oracle metrics."""

    def score(prompts: Sequence[Prompt], texts: Sequence[str], ids: Sequence[Sequence[int]]) -> Scores:
        h = torch.tensor([world.helpfulness(p.dialog, t) for p, t in zip(prompts, texts, strict=True)])
        s = torch.tensor([world.safety(p.dialog, t) for p, t in zip(prompts, texts, strict=True)])
        return Scores(h.float(), s.float())

    return score


def combine(scores: Scores, is_safety: torch.Tensor) -> torch.Tensor:
    """R_c (B,): SPEC §8's gate when both judges are present, else the one that is."""
    h, s = scores
    if h is not None and s is not None:
        return combined_score(h, s, is_safety)
    if h is None and s is None:
        raise ValueError("ppo: no reward: give models.helpfulness_rm and/or models.safety_rm")
    return h if h is not None else s


def score_reward(combined: torch.Tensor, group: int = 1) -> torch.Tensor:
    """R̃_c = WHITEN(LOGIT(R_c)) (B,): over the batch of rollouts, or with `group` > 1 centred on each run of
    `group` consecutive rollouts (one prompt's samples) and scaled by the batch std of the centred scores."""
    x = logit(combined.float())
    if group > 1:
        samples = x.view(-1, group)  # one row per prompt
        x = (samples - samples.mean(1, keepdim=True)).flatten()
    return whiten(x)


# step 3 ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def forward_rollouts(model: ActorCritic, reference: Transformer, tokens: torch.Tensor, micro: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log π_θ, log π_0, values, entropy), each (B, T−1), in micro-batches of rows."""
    device = next(model.parameters()).device
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for start in range(0, tokens.shape[0], micro):
        t = tokens[start : start + micro].to(device)
        logits, values = model(t)
        parts[0].append(gather_logprobs(logits, t).cpu())
        parts[1].append(gather_logprobs(reference(t), t).cpu())
        parts[2].append(values[:, :-1].cpu())
        parts[3].append(entropy(logits[:, :-1]).cpu())
    return tuple(torch.cat(p) for p in parts)


def generation_parity(generated: Sequence[Sequence[float]], prompts: Sequence[Prompt], logprobs: torch.Tensor
                      ) -> float:
    """max |generator log-prob − recomputed log-prob| over every sampled token (EOS is not returned by the
    generator, so it is left out)."""
    worst = 0.0
    for b, (p, lp) in enumerate(zip(prompts, generated, strict=True)):
        if lp:
            start = len(p.ids) - 1
            diff = (torch.tensor(lp) - logprobs[b, start : start + len(lp)]).abs().max()
            worst = max(worst, float(diff))
    return worst


@torch.no_grad()
def heldout_reward(policy: Transformer, prompts: Sequence[Prompt], tokenizer: Tokenizer, scorer: Scorer,
                   oracle: Scorer | None, es: EarlyStopping, h: PPOHyper, generator: torch.Generator
                   ) -> dict[str, float | None]:
    """Mean R_c (sigmoid scale) of the policy's responses to held-out prompts, as the reward models score
    them (`reward`), and with a toy world the oracle's `oracle_combined` and its score of each kind of prompt,
    to see whether the rule picks what the judges would."""
    responses, _, _ = generate_responses(policy, prompts, tokenizer.eos_id,
                                         replace(h, temperature=es.temperature, top_p=es.top_p), generator)
    texts = [tokenizer.decode(r).strip() for r in responses]
    is_safety = torch.tensor([p.is_safety for p in prompts])
    out: dict[str, float | None] = {"reward": float(combine(scorer(prompts, texts, responses), is_safety).mean())}
    if oracle is not None:
        o = oracle(prompts, texts, responses)
        out["oracle_combined"] = float(combined_score(o.helpfulness, o.safety, is_safety).mean())
        out.update(by_prompt_kind("oracle", o.helpfulness, o.safety, is_safety))
    return out


# steps 1-5 -------------------------------------------------------------------------------------------------


def make_rollout(model: ActorCritic, reference: Transformer, prompts: Sequence[Prompt], tokenizer: Tokenizer,
                 scorer: Scorer, h: PPOHyper, generator: torch.Generator, sampler: Transformer | None = None
                 ) -> tuple[Rollout, list[str]]:
    """Steps 1-5 for one batch of prompts → (the rollout, the response texts). `sampler`: a copy of the
    policy (e.g. in bf16) that generates in its place."""
    # 1. generate
    started = time.perf_counter()
    responses, gen_logprobs, truncated = generate_responses(sampler or model.policy, prompts, tokenizer.eos_id, h,
                                                            generator)
    seconds_generation = time.perf_counter() - started  # the ids are Python lists: the device has synced
    texts = [tokenizer.decode(r).strip() for r in responses]
    tokens, mask, lengths = pack_rollouts(prompts, responses, truncated, tokenizer.eos_id)
    # 2. score
    scores = scorer(prompts, texts, responses)
    is_safety = torch.tensor([p.is_safety for p in prompts])
    combined = combine(scores, is_safety).float()
    score = score_reward(combined, h.samples_per_prompt if h.score_whitening == "prompt" else 1)
    # 3. log-probs of policy and reference, values, entropy
    logprobs, ref_logprobs, values, ent = forward_rollouts(model, reference, tokens, h.micro_batch_size)
    maskf = mask.float()
    logprobs, ref_logprobs, values = logprobs * maskf, ref_logprobs * maskf, values * maskf
    # 4. rewards
    kl = kl_penalty(logprobs, ref_logprobs, h.kl_estimator) * maskf
    rewards = token_rewards(score, kl, mask, h.beta)
    # 5. advantages
    advantages, returns = gae(rewards, values, mask, h.gamma, h.lam)
    if h.whiten_advantages:
        advantages = whiten(advantages, mask)
    nan = torch.full((len(prompts),), float("nan"))
    rollout = Rollout(
        tokens, mask, lengths, torch.tensor(truncated), is_safety,
        scores.helpfulness.float() if scores.helpfulness is not None else nan,
        scores.safety.float() if scores.safety is not None else nan,
        combined, score, logprobs, ref_logprobs, values, ent * maskf, kl, rewards, advantages, returns,
        generation_parity(gen_logprobs, prompts, logprobs), seconds_generation,
    )
    return rollout, texts


# step 6 ----------------------------------------------------------------------------------------------------


def ppo_update(model: ActorCritic, optimizer: torch.optim.Optimizer, rollout: Rollout, h: PPOHyper, grad_clip: float,
               generator: torch.Generator, on_micro: Callable[[], None] = lambda: None) -> dict[str, float]:
    """PPO epochs over the rollout: shuffled mini-batches, one optimizer step each; mean stats of all steps.

    A mini-batch's loss is the token-mean over all its response tokens; micro-batches are weighted by their
    share of those tokens, so accumulation gives the same gradient as one forward over the mini-batch.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    totals: dict[str, float] = {}
    steps = 0
    model.train()
    for _ in range(h.epochs):
        order = torch.randperm(rollout.tokens.shape[0], generator=generator)
        for mb_start in range(0, len(order), h.mini_batch_size):
            mini = order[mb_start : mb_start + h.mini_batch_size]
            mb_tokens = rollout.mask[mini].sum().clamp(min=1)
            stats: dict[str, float] = {}
            for start in range(0, len(mini), h.micro_batch_size):
                rows = mini[start : start + h.micro_batch_size]
                share = float(rollout.mask[rows].sum() / mb_tokens)
                width = int(rollout.mask[rows].any(0).nonzero().max()) + 2  # trim right padding
                t = rollout.tokens[rows, :width].to(device)
                m = rollout.mask[rows, : width - 1].to(device)

                def cut(x: torch.Tensor, rows=rows, width=width) -> torch.Tensor:
                    return x[rows, : width - 1].to(device)

                logits, values = model(t)
                pl, p_stats = policy_loss(gather_logprobs(logits, t), cut(rollout.logprobs), cut(rollout.advantages),
                                          m, h.clip)
                vl, v_stats = value_loss(values[:, :-1], cut(rollout.values), cut(rollout.returns), m, h.value_clip)
                ((pl + h.vf_coef * vl) * share).backward()
                losses = {"policy_loss": float(pl.detach()), "value_loss": float(vl.detach())}
                for k, v in {**p_stats, **v_stats, **losses}.items():
                    stats[k] = stats.get(k, 0.0) + v * share
                on_micro()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats["grad_norm"] = float(grad_norm)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            steps += 1
    return {k: v / steps for k, v in totals.items()}


# --- observability -----------------------------------------------------------------------------------------


def _nanmean(x: torch.Tensor) -> float | None:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else None


KIND_KEYS = {prefix: [f"{prefix}_helpfulness_on_helpful_prompts", f"{prefix}_safety_on_safety_prompts"]
             for prefix in ("reward", "oracle")}


def by_prompt_kind(prefix: str, helpfulness: torch.Tensor, safety: torch.Tensor, is_safety: torch.Tensor
                   ) -> dict[str, float | None]:
    """Helpfulness on the prompts not tagged safety and safety on those tagged: the scores each kind of prompt
    is rewarded with. Means over the whole batch mix in scores no prompt is rewarded with (the helpfulness of
    a refusal to an attack), and move with the batch's share of safety prompts (0.16-0.50 in the demo's
    batches of 32), which hides what PPO does to either kind."""
    helpful_key, safety_key = KIND_KEYS[prefix]
    return {helpful_key: _nanmean(helpfulness[~is_safety]), safety_key: _nanmean(safety[is_safety])}


def rollout_metrics(rollout: Rollout, h: PPOHyper) -> dict[str, float | None]:
    """The per-iteration numbers of a rollout: raw and whitened reward, KL as charged, length, entropy."""
    m = rollout.mask
    seq_kl = rollout.kl.sum(1)
    return {
        "reward_helpfulness": _nanmean(rollout.helpfulness),
        "reward_safety": _nanmean(rollout.safety),
        **by_prompt_kind("reward", rollout.helpfulness, rollout.safety, rollout.is_safety),
        "reward_combined": float(rollout.combined.mean()),
        "reward_logit": float(logit(rollout.combined).mean()),
        "reward_whitened_mean": float(rollout.score.mean()),
        "reward_whitened_std": float(rollout.score.std(unbiased=False)),
        "reward_total": float(rollout.rewards.sum(1).mean()),
        "kl": float(seq_kl.mean()),
        "kl_per_token": float(masked_mean(rollout.kl, m)),
        "kl_negative_fraction": float((seq_kl < 0).float().mean()),
        "response_length": float(rollout.response_lengths.float().mean()),
        "truncated_fraction": float(rollout.truncated.float().mean()),
        "entropy": float(masked_mean(rollout.entropy, m)),
        "value_mean": float(masked_mean(rollout.values, m)),
        "safety_prompt_fraction": float(rollout.is_safety.float().mean()),
        "generation_logprob_max_diff": rollout.generation_parity,
    }


def _mean_of(records: Sequence[dict], key: str) -> float | None:
    """Mean of `key` over the metric records that have it (a batch may hold no prompt of one kind: None)."""
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def warnings_for(record: dict, history: Sequence[dict], h: PPOHyper, window: int) -> list[str]:
    """Negative KL, runaway length, and the reward rising while the oracle falls (reward hacking)."""
    found = []
    if record["kl"] < 0:
        found.append(f"negative KL estimate {record['kl']:.4g} ({h.kl_estimator}): the policy puts less mass "
                     "than π_0 on its own samples; with k1 this is noise at small KL, persistent means a bug")
    if h.kl_target is not None and record["kl"] > h.kl_target:
        found.append(f"KL to π_0 {record['kl']:.4g} is above the target {h.kl_target:g}: the policy is drifting "
                     "from the reference faster than planned (raise beta or lower the learning rate)")
    if record["response_length"] > 0.9 * h.max_gen_len or record["truncated_fraction"] > 0.5:
        found.append(f"runaway length: mean {record['response_length']:.1f} of max {h.max_gen_len} tokens, "
                     f"{record['truncated_fraction']:.0%} truncated")
    recent = [r for r in [*history, record] if r.get("oracle_combined") is not None][-window:]
    if len(recent) >= max(window, 4):
        half = len(recent) // 2

        def rise(key: str) -> float | None:
            before, after = _mean_of(recent[:half], key), _mean_of(recent[half:], key)
            return None if before is None or after is None else after - before

        # Each kind of prompt against its own judge: the batch means move with the share of safety prompts,
        # which raises R_c (safety RM ~0.8 on attacks, helpfulness RM ~0.45) and lowers the oracle's mean at
        # once, so that on the whole batch a drawn mix looked like hacking (runs/demo41_seed1: R_c 0.530 ->
        # 0.563, oracle 0.570 -> 0.506, while by kind the RMs moved +0.003 and +0.003, the oracle -0.008 and +0.008).
        for reward_key, oracle_key in zip(KIND_KEYS["reward"], KIND_KEYS["oracle"], strict=True):
            up, down = rise(reward_key), rise(oracle_key)
            if up is not None and down is not None and up > 0 and down < 0:
                kind = reward_key.removeprefix("reward_")
                found.append(f"reward hacking? over the last {len(recent)} iterations the reward ({kind}) rose "
                             f"by {up:.3f} while the oracle's fell by {-down:.3f}")
    return found


def summarize(history: Sequence[dict], cfg: Config) -> dict:
    """summary.json: the keys the pipeline's report reads (`mean_kl`, `reward_start`, `reward_end`).

    Start and end values are means over the first and last eighth of the iterations (at least one): a single
    iteration's batch of prompts is too noisy to compare (`summary_window` records the width)."""
    first, last = history[0], history[-1]
    window = max(1, len(history) // 8)

    def start(key: str) -> float | None:
        return _mean_of(history[:window], key)

    def end(key: str) -> float | None:
        return _mean_of(history[-window:], key)

    out = {
        "iterations": last["iteration"],
        "reward_source": cfg.models.reward_source,
        "kl_estimator": cfg.ppo.kl_estimator,
        "beta": cfg.ppo.beta,
        "mean_kl": sum(r["kl"] for r in history) / len(history),
        "kl_end": last["kl"],
        "kl_target": cfg.ppo.kl_target,
        "summary_window": window,
        "reward_start": start("reward_combined"),
        "reward_end": end("reward_combined"),
        **{f"{key}_{edge}": f(key) for key in KIND_KEYS["reward"] for edge, f in (("start", start), ("end", end))},
        "response_length_start": start("response_length"),
        "response_length_end": end("response_length"),
        "warnings": sum(len(r.get("warnings", [])) for r in history),
    }
    if first.get("oracle_combined") is not None:
        for key in ("oracle_combined", "oracle_helpfulness", "oracle_safety", *KIND_KEYS["oracle"]):
            out[f"{key}_start"], out[f"{key}_end"] = start(key), end(key)
    return out


def plot_curves(history: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward (sigmoid scale)", ["reward_combined", *KIND_KEYS["reward"]]),
              ("toy-world oracle", ["oracle_combined", *KIND_KEYS["oracle"]]),
              ("held-out reward (early stopping)", ["heldout_reward", "heldout_oracle_combined"]),
              ("KL to π_0 (per sequence)", ["kl"]), ("response length", ["response_length"]),
              ("entropy (per token)", ["entropy"]), ("clip fraction", ["clip_fraction"]),
              ("value loss", ["value_loss"])]
    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    its = [r["iteration"] for r in history]
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            ys = [r.get(key) for r in history]
            if any(y is not None for y in ys):
                ax.plot(its, [float("nan") if y is None else y for y in ys], label=key, marker=".")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if len(keys) > 1 and ax.lines:  # a run without the toy world's oracle has nothing in that panel
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the stage ---------------------------------------------------------------------------------------------


@dataclass
class PPOResult:
    """What `run` returns (the CLI reads `interrupted`)."""

    iteration: int
    """Iterations completed."""
    summary: dict
    """The contents of summary.json."""
    checkpoint: Path | None
    """The newest checkpoint; its `model/` is the trained policy (`model_dir(out_dir)` finds it)."""
    interrupted: bool = False


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _setup_models(cfg: Config, env: DistEnv) -> tuple[ActorCritic, Transformer, Tokenizer, Path]:
    source = model_dir(cfg.models.policy)
    tokenizer = Tokenizer(find_tokenizer(source))
    policy = load_model(source, tokenizer.n_words, device=env.device, dtype=torch.float32)
    reference = copy.deepcopy(policy).to(_DTYPES[cfg.models.reference_dtype]).eval().requires_grad_(False)
    value_model = None
    if cfg.models.value == "separate":
        if cfg.models.helpfulness_rm:
            value_model, _ = load_scalar_head(model_dir(cfg.models.helpfulness_rm), env.device, torch.float32)
            if value_model.args.vocab_size != policy.args.vocab_size:
                raise ValueError("ppo: the helpfulness RM's vocabulary differs from the policy's; it cannot "
                                 "initialise the value model")
        else:
            value_model = ScalarHeadModel.from_language_model(copy.deepcopy(policy))
    return ActorCritic(policy, value_model).to(env.device), reference, tokenizer, source


def _setup_scorer(cfg: Config, env: DistEnv, world) -> Scorer:
    m = cfg.models
    if m.reward_source == "oracle":
        if world is None:
            raise ValueError("ppo: reward_source oracle needs models.toyworld_seed")
        print("ppo: SANITY RUN: the reward is the toy world's oracle judges, not reward models", file=sys.stderr)
        return oracle_scorer(world)
    rms = []
    for path in (m.helpfulness_rm, m.safety_rm):
        if not path:
            rms.append(None)
            continue
        accuracy = check_rm_gate(path, m.min_rm_accuracy, m.allow_weak_rm)
        if accuracy is None or accuracy < m.min_rm_accuracy:
            print(f"ppo: warning: using weak reward model {path} (accuracy {accuracy})", file=sys.stderr)
        rms.append(load_reward_model(path, env.device, _DTYPES[m.rm_dtype]))
    if rms == [None, None]:
        raise ValueError("ppo: no reward: give models.helpfulness_rm and/or models.safety_rm (or "
                         "reward_source: oracle with a toy world)")
    return rm_scorer(rms[0], rms[1], cfg.ppo.micro_batch_size)


def _sampler(policy: Transformer, dtype: str) -> Transformer | None:
    """The rollout copy of the policy in `dtype`, or None to sample from the policy itself."""
    if _DTYPES[dtype] == torch.float32:
        return None
    return copy.deepcopy(policy).to(_DTYPES[dtype]).eval().requires_grad_(False)


@torch.no_grad()
def refresh_sampler(sampler: Transformer, policy: Transformer) -> None:
    """Copy the policy's current weights into the sampler in place: the storage stays the same, so its
    captured decoding steps (CUDA graphs) stay valid."""
    for dst, src in zip(sampler.parameters(), policy.parameters(), strict=True):
        dst.copy_(src)


def _optimizer(model: nn.Module, o: Optim) -> torch.optim.AdamW:
    # The engine's AdamW (decay on matrices only) at a constant rate: no schedule is ever attached.
    return build_optimizer(model, TrainConfig(lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
                                              weight_decay=o.weight_decay, grad_clip=o.grad_clip))


def run(cfg: Config, scorer: Scorer | None = None) -> PPOResult:
    """Run PPO as configured, resuming if `out_dir` holds a checkpoint. `scorer` replaces the configured
    reward (RMs or oracle) by any function, e.g. a test's toy reward; the oracle metrics still apply."""
    with distributed_run(cfg.device) as env:
        if env.world_size > 1:
            raise ValueError("ppo: runs in one process for now (docs/ppo.md gives the multi-GPU plan)")
        return _run(cfg, scorer, env)


def _run(cfg: Config, scorer: Scorer | None, env: DistEnv) -> PPOResult:
    started = time.perf_counter()
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights, TF32 tensor-core matmuls (3x on Hopper)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    h = cfg.ppo

    # setup: models, prompts, reward, optimizer; then resume
    model, reference, tokenizer, source = _setup_models(cfg, env)
    world = None
    if cfg.models.toyworld_seed is not None:
        from llama2.data.toyworld import ToyWorld

        world = ToyWorld(cfg.models.toyworld_seed)
    scorer = scorer or _setup_scorer(cfg, env, world)
    oracle = oracle_scorer(world) if world is not None else None
    prompts = read_prompts(cfg.prompts.files, tokenizer, cfg.prompts)
    sampler = _sampler(model.policy, cfg.models.rollout_dtype)
    optimizer = _optimizer(model, cfg.optim)
    export_policy = hf_exporter(model.policy.args, tokenizer.model_path)

    def export(state: dict[str, torch.Tensor], path: Path) -> None:
        export_policy({k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}, path)

    config_yaml = dump_config(cfg, header="resolved config; rerun with: llama2 ppo --config THIS_FILE")

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    iteration, last_ckpt, resumed = 0, None, {}
    resume = find_resume_point(ckpt_root, env)
    if resume is not None:
        resumed = load_checkpoint(resume, env, model, optimizer)
        iteration = resumed["step"]
        last_ckpt = resume
        print(f"ppo: resuming from {resume} (iteration {iteration})", file=sys.stderr)
    history = truncate_log(metrics_path, "iteration", iteration)
    es = cfg.early_stopping
    stopper = EarlyStopper(es, out, iteration) if es.enabled else None
    heldout = read_prompts(es.prompts, tokenizer, cfg.prompts)[: es.max_prompts] if es.enabled else []

    def save(**state) -> Path:
        path = save_checkpoint(ckpt_root, iteration, env, model, optimizer, {"source": str(source), **state}, export,
                               config_yaml, cfg.keep_checkpoints)
        if stopper is not None:
            stopper.prune()
        return path

    def evaluate() -> dict | None:
        """The held-out evaluation of the policy after `iteration` iterations, when one is due."""
        if stopper is None or not stopper.due(iteration):
            return None
        gen = _generator(cfg.prompts.seed, 0, "heldout", env.device)  # the same draws at every evaluation
        result = heldout_reward(model.policy, heldout, tokenizer, scorer, oracle, es, h, gen)
        entry = stopper.record(iteration, result.pop("reward"), model.policy.state_dict(), **result)
        print(f"ppo: held-out reward {entry['reward']:.4f} at iteration {iteration}"
              f"{' (best)' if entry['best'] else ''}", file=sys.stderr)
        return entry

    evaluate()  # the starting policy: a run that never beats it ends on it

    # the loop
    while iteration < h.iterations and not (stopper is not None and stopper.stop()):
        t0 = time.perf_counter()
        k = h.samples_per_prompt
        batch = [prompts[i] for i in prompt_indices(len(prompts), h.batch_size // k, iteration, cfg.prompts.seed)
                 for _ in range(k)]
        gen = _generator(cfg.prompts.seed, iteration, "sample", env.device)
        if sampler is not None:
            refresh_sampler(sampler, model.policy)
        rollout, texts = make_rollout(model, reference, batch, tokenizer, scorer, h, gen, sampler)  # steps 1-5
        t_rollout = time.perf_counter() - t0

        def on_micro(it: int = iteration) -> None:  # fault point for the resume tests: killed mid-update
            maybe_kill("mid_iteration", it + 1)

        t1 = time.perf_counter()
        stats = ppo_update(model, optimizer, rollout, h, cfg.optim.grad_clip,  # step 6
                           _generator(cfg.prompts.seed, iteration, "shuffle", torch.device("cpu")), on_micro)
        t_update = time.perf_counter() - t1
        iteration += 1
        record: dict = {"iteration": iteration, **rollout_metrics(rollout, h), **stats}
        if oracle is not None:
            o = oracle(batch, texts, [])
            record["oracle_helpfulness"] = float(o.helpfulness.mean())
            record["oracle_safety"] = float(o.safety.mean())
            record["oracle_combined"] = float(combined_score(o.helpfulness, o.safety, rollout.is_safety).mean())
            record.update(by_prompt_kind("oracle", o.helpfulness, o.safety, rollout.is_safety))
        held = evaluate()
        if held is not None:
            record["heldout_reward"] = held["reward"]
            record["heldout_oracle_combined"] = held.get("oracle_combined")
        record["warnings"] = warnings_for(record, history, h, cfg.hacking_window)
        record["seconds_generation"] = rollout.seconds_generation
        record["seconds_rollout"] = t_rollout
        record["seconds_update"] = t_update
        record["seconds"] = time.perf_counter() - t0
        for w in record["warnings"]:
            print(f"ppo: warning (iteration {iteration}): {w}", file=sys.stderr)
        history.append(record)
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"ppo: iteration {iteration}/{h.iterations} reward {record['reward_combined']:.4f} "
              f"kl {record['kl']:.4f} len {record['response_length']:.1f} {record['seconds']:.1f}s",
              file=sys.stderr)
        stopping = stopper is not None and stopper.stop()
        if stopping:
            print(f"ppo: early stop at iteration {iteration}: no better held-out reward in "
                  f"{es.patience} evaluations", file=sys.stderr)
        if iteration == h.iterations or stopping or (cfg.checkpoint_every and iteration % cfg.checkpoint_every == 0):
            last_ckpt = save()
        maybe_kill("after_step", iteration)

    # cleanup: the best policy, summary and curves
    best = stopper.best() if stopper is not None else None
    if best is not None and best["iteration"] != iteration and resumed.get("policy_from") != best["iteration"]:
        # the run's output is the best held-out policy: the last checkpoint is written again with its weights
        model.policy.load_state_dict(stopper.best_state())
        last_ckpt = save(policy_from=best["iteration"])
    summary = summarize(history, cfg) if history else {}
    if best is not None:
        summary["early_stopping"] = {"best_iteration": best["iteration"], "best_reward": best["reward"],
                                     "evaluations": len(stopper.evaluations), "stopped_early": iteration < h.iterations}
    (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    if history:
        plot_curves(history, out / CURVES)
    print(f"ppo: {iteration} iterations in {time.perf_counter() - started:.1f}s; reward "
          f"{summary.get('reward_start')} -> {summary.get('reward_end')}; policy in "
          f"{last_ckpt / 'model' if last_ckpt else '-'}", file=sys.stderr)
    return PPOResult(iteration, summary, last_ckpt)
