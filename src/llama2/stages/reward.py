"""Reward-model training (SPEC §7): the helpfulness RM and the safety RM.

setup → loop → cleanup: read preference pairs (native jsonl or Anthropic HH), mix in a share of the other
kind's pairs (the paper's safety RM: 90% safety + 10% helpfulness data), encode each response after its
prompt as the policy sees it (`encode_scored`), turn the chat checkpoint into a scalar-head model
(`ScalarHeadModel.from_language_model`, head zero-initialised), and train the ranking loss with the rating
margin (`losses.reward_model_loss`) for one epoch on the shared engine. At the end the RM is evaluated on
the held-out pairs and the result is recorded as `rm_eval.json`: rejection sampling and PPO read it to
refuse an RM below their accuracy gate.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from llama2.config import dump_config
from llama2.data.formats import PreferenceRecord, read_preferences
from llama2.data.pair_rows import pair_rows, shared_prefix
from llama2.data.sampler import ShuffledBatches, sequential_batches
from llama2.generation.llama import find_tokenizer
from llama2.model.args import ModelArgs
from llama2.model.checkpoint import load_checkpoint
from llama2.model.heads import ScalarHeadModel, save_scalar_head_hf
from llama2.model.transformer import Transformer
from llama2.stages.artifacts import model_dir
from llama2.stages.reward_models import RM_EVAL_FILE, encode_scored, pad_id_for, right_pad
from llama2.tokenizer.tokenizer import Tokenizer
from llama2.training.checkpointing import ModelExport
from llama2.training.loop import TrainConfig, Trainer, TrainResult, fit_batches
from llama2.training.losses import rating_margin, reward_model_loss
from llama2.training.parallel import distributed_run

MarginMode = Literal["none", "small", "large"]


@dataclass
class RewardData:
    """The preference pairs to learn from and to test on."""

    train_files: list[str] = field(default_factory=list)
    """Preference files of this RM's own kind (native jsonl or Anthropic HH `.jsonl(.gz)`), all used."""
    mix_files: list[str] = field(default_factory=list)
    """Pairs of the other kind, sampled to make up `mix_fraction` of the training set."""
    mix_fraction: float = 0.1
    """Share of the training pairs drawn from `mix_files` (SPEC §7: 0.1 for the safety RM; the helpfulness
    RM adds "an equal amount" of other data, 0.5). Capped by what `mix_files` hold."""
    val_files: list[str] = field(default_factory=list)
    """Pairs for the validation loss during training (optional)."""
    test_files: list[str] = field(default_factory=list)
    """Held-out pairs evaluated after training (accuracy per rating, per file) and recorded in rm_eval.json."""
    seed: int = 0
    """Seed of the mix sample and of the pair order."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.mix_fraction < 1.0:
            raise ValueError(f"data.mix_fraction must be in [0, 1), got {self.mix_fraction}")


@dataclass
class RewardEval:
    """The evaluation run at the end of training."""

    oracle: Literal["", "toyworld"] = ""
    """`toyworld`: also report the correlation with the toy world's oracle judges and the label ceiling."""
    world_seed: int = 0
    """Seed of the toy world that generated the pairs (for the oracle)."""
    batch_size: int = 16
    """Sequences per scoring forward pass."""


def _default_train() -> TrainConfig:
    # SPEC §7: AdamW as pretraining, max lr 1e-5 (5e-6 for 70B), cosine to 10%, 512 pairs a batch, 1 epoch.
    return TrainConfig(steps=1, global_batch_size=512, micro_batch_size=4, lr=1e-5, warmup_steps=5)


@dataclass
class Config:
    """`llama2 reward`: a chat checkpoint, preference pairs, the margin and the engine's settings."""

    out_dir: str = "runs/reward"
    """Run directory: checkpoints (each `model/` a HF LlamaForSequenceClassification), metrics, rm_eval.json."""
    init_from: str = ""
    """The chat model the RM starts from (SPEC §7: the RM knows what the policy knows): model or run dir."""
    kind: Literal["helpfulness", "safety"] = "helpfulness"
    """Which RM this is; recorded in rm_eval.json and the plots."""
    max_seq_len: int | None = None
    """Longest prompt + response in tokens; longer ones keep BOS and their last tokens (None: model context)."""
    epochs: float = 1.0
    """Passes over the pairs (SPEC §7: 1, longer overfits); sets `train.steps`."""
    likelihood_gate: bool = False
    """Add the chat model's gated surprise at each response token to the scalar head's reward
    (`ScalarHeadModel.likelihood_term`). Not in the paper: for toy-scale RMs, which otherwise learn an answer's
    form and not whether it is right; its HF export scores the scalar part only in `transformers`."""
    shared_prompt: bool = True
    """Train on one row per pair, the ids both sides share read once (`data.pair_rows`): the same rewards and
    gradients as two separate sequences, from fewer tokens (38% fewer on the demo's helpfulness pairs)."""
    margin: MarginMode = "small"
    """m(rating) of the loss (SPEC §7 Table 27): `none`, `small` (1, 2/3, 1/3, 0) or `large` (3, 2, 1, 0)."""
    safety_loss_weight: float = 0.0
    """Weight of the safety auxiliary loss (BCE of σ(r) on safe/unsafe labels); 0 turns it off."""
    warmup_fraction: float = 0.03
    """Warmup as a share of the steps, at least `min_warmup_steps` (SPEC §7: 3%, min 5); sets `train.warmup_steps`."""
    min_warmup_steps: int = 5
    """Lower bound of the warmup (never more than half the steps of a very short run)."""
    data: RewardData = field(default_factory=RewardData)
    """The pairs."""
    eval: RewardEval = field(default_factory=RewardEval)
    """The evaluation after training."""
    train: TrainConfig = field(default_factory=_default_train)
    """Optimizer, schedule, precision, parallelism, logging, checkpoints; batch sizes count pairs."""


@dataclass
class PairExample:
    """One encoded preference pair."""

    chosen: list[int]
    rejected: list[int]
    chosen_start: int
    """Index of the chosen response's first id (`encode_scored`); likewise `rejected_start`."""
    rejected_start: int
    margin: float
    chosen_safe: int
    """1 safe, 0 unsafe, −1 unlabelled (also for the rejected side)."""
    rejected_safe: int


def read_pairs(files: list[str]) -> list[PreferenceRecord]:
    """All usable pairs of `files`; identical responses carry no preference and are left out."""
    records = []
    for f in files:
        records += [r for r in read_preferences(f) if "identical" not in r.notes]
    return records


def mix_pairs(main: list[PreferenceRecord], extra: list[PreferenceRecord], fraction: float,
              seed: int) -> list[PreferenceRecord]:
    """`main` plus a sample of `extra` making up `fraction` of the result (all of `extra` if it holds fewer)."""
    wanted = round(len(main) * fraction / (1.0 - fraction))
    return main + random.Random(seed).sample(extra, min(wanted, len(extra)))


def encode_pair(tokenizer: Tokenizer, record: PreferenceRecord, margin: str, max_len: int) -> PairExample:
    safety = record.safety
    (chosen, chosen_start), (rejected, rejected_start) = (
        encode_scored(tokenizer, record.prompt, response, max_len) for response in (record.chosen, record.rejected))
    return PairExample(
        chosen, rejected, chosen_start, rejected_start,
        rating_margin(record.rating, margin),
        -1 if safety is None else int(safety["chosen_safe"]),
        -1 if safety is None else int(safety["rejected_safe"]),
    )


def collate_pairs(examples: list[PairExample], pad_id: int, shared_prompt: bool = False) -> dict[str, torch.Tensor]:
    """The `reward_model_loss` batch: chosen rows then rejected rows, right-padded together; or, with
    `shared_prompt`, one row per pair (`pairs`, see `data.pair_rows`)."""
    safe = torch.tensor([e.chosen_safe for e in examples] + [e.rejected_safe for e in examples], dtype=torch.long)
    margin = torch.tensor([e.margin for e in examples])
    if shared_prompt:
        pairs = pair_rows([e.chosen for e in examples], [e.rejected for e in examples],
                          [e.chosen_start for e in examples], [e.rejected_start for e in examples], pad_id)
        return {"pairs": pairs, "margin": margin, "safe": safe}
    tokens, lengths = right_pad([e.chosen for e in examples] + [e.rejected for e in examples], pad_id)
    starts = torch.tensor([e.chosen_start for e in examples] + [e.rejected_start for e in examples])
    return {"tokens": tokens, "lengths": lengths, "starts": starts, "margin": margin, "safe": safe}


def row_length(pair: PairExample, shared_prompt: bool) -> int:
    """Ids a pair puts in its batch's widest row (batches group pairs of similar length)."""
    if shared_prompt:
        return len(pair.chosen) + len(pair.rejected) - shared_prefix(pair.chosen, pair.rejected)
    return max(len(pair.chosen), len(pair.rejected))


def reward_exporter(args: ModelArgs, tokenizer_model: Path, pad_id: int, likelihood_gate: bool) -> ModelExport:
    """Writes each checkpoint's `model/` as a HF LlamaForSequenceClassification directory."""

    def export(state: dict[str, torch.Tensor], path: Path) -> None:
        with torch.device("meta"):
            model = ScalarHeadModel(Transformer(args), likelihood_gate)
        model.load_state_dict(state, strict=True, assign=True)
        save_scalar_head_hf(model, path, pad_id, tokenizer_model)

    return export


def warmup_steps(steps: int, fraction: float, minimum: int) -> int:
    """SPEC §7's warmup: `fraction` of the steps, at least `minimum`, at most half the run."""
    return min(max(minimum, math.ceil(fraction * steps)), max(1, steps // 2))


def run(cfg: Config) -> TrainResult:
    """Train the reward model as configured (resuming if `out_dir` holds a checkpoint), then evaluate it."""
    started = time.perf_counter()
    if not cfg.data.train_files:
        raise ValueError("reward: data.train_files is empty; give at least one preference file")
    with distributed_run(cfg.train.device) as env:
        # 1. the chat model and its tokenizer, turned into a scalar-head model
        source = model_dir(cfg.init_from)
        tokenizer = Tokenizer(find_tokenizer(source))
        model = ScalarHeadModel.from_language_model(load_checkpoint(source, tokenizer.n_words),
                                                     cfg.likelihood_gate)
        max_len = cfg.max_seq_len or model.args.max_seq_len
        pad_id = pad_id_for(tokenizer)
        # 2. data: own pairs + the mixed-in share of the other kind, encoded and shuffled by the sampler
        own = read_pairs(cfg.data.train_files)
        records = mix_pairs(own, read_pairs(cfg.data.mix_files), cfg.data.mix_fraction, cfg.data.seed)
        pairs = [encode_pair(tokenizer, r, cfg.margin, max_len) for r in records]
        if env.is_main:
            print(f"reward: {len(pairs)} training pairs ({len(records) - len(own)} mixed in), margin {cfg.margin}",
                  file=sys.stderr)
        train_cfg = fit_batches(cfg.train, len(pairs), env.world_size, cfg.epochs)
        train_cfg = replace(train_cfg, warmup_steps=warmup_steps(train_cfg.steps, cfg.warmup_fraction,
                                                                 cfg.min_warmup_steps))
        collate = partial(collate_pairs, pad_id=pad_id, shared_prompt=cfg.shared_prompt)
        batches = ShuffledBatches(pairs, collate, train_cfg.micro_batch_size, train_cfg.global_batch_size, env.rank,
                                  env.world_size, cfg.data.seed,
                                  lengths=[row_length(p, cfg.shared_prompt) for p in pairs])
        val = None
        if cfg.data.val_files:
            val_pairs = [encode_pair(tokenizer, r, cfg.margin, max_len) for r in read_pairs(cfg.data.val_files)]
            val = partial(sequential_batches, val_pairs, collate, train_cfg.micro_batch_size, env.rank,
                          env.world_size)
        # 3. the loop
        resolved = replace(cfg, max_seq_len=max_len, train=train_cfg)
        trainer = Trainer(
            model, batches, partial(reward_model_loss, safety_weight=cfg.safety_loss_weight), train_cfg,
            cfg.out_dir, env, val_batches=val,
            export=reward_exporter(model.args, tokenizer.model_path, pad_id, cfg.likelihood_gate),
            config_yaml=dump_config(resolved, header="resolved config; rerun with: llama2 reward --config THIS_FILE"),
            flops_per_token=model.args.flops_per_token(max_len),
        )
        result = trainer.fit()
        # 4. held-out evaluation, recorded for the gate of rejection sampling and PPO
        if env.is_main and cfg.data.test_files and result.checkpoint is not None:
            report = evaluate_run(cfg, result.checkpoint / "model")
            print(f"reward: held-out accuracy {report['accuracy']:.3f} ({RM_EVAL_FILE})", file=sys.stderr)
        if env.is_main:
            print(f"reward: {result.step} steps in {time.perf_counter() - started:.1f}s; final loss "
                  f"{result.final_loss}; model in {result.checkpoint / 'model' if result.checkpoint else '-'}",
                  file=sys.stderr)
        return result


def evaluate_run(cfg: Config, rm_dir: Path) -> dict:
    """Evaluate the trained RM on `data.test_files`; write rm_eval.json (run and model folders) and plots."""
    from llama2.evaluation.rewards import evaluate_reward_model
    from llama2.stages.reward_models import load_reward_model

    rm = load_reward_model(rm_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    test_sets = {Path(f).name: read_pairs([f]) for f in cfg.data.test_files}
    world = None
    if cfg.eval.oracle == "toyworld":
        from llama2.data.toyworld import ToyWorld

        world = ToyWorld(cfg.eval.world_seed)
    report = {"kind": cfg.kind, "margin": cfg.margin, "model": str(rm_dir),
              **evaluate_reward_model(rm, test_sets, cfg.eval.batch_size, world, Path(cfg.out_dir))}
    text = json.dumps(report, indent=2) + "\n"
    (Path(cfg.out_dir) / RM_EVAL_FILE).write_text(text)
    (rm_dir / RM_EVAL_FILE).write_text(text)
    return report


