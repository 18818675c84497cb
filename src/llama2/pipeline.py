"""The whole Llama 2 recipe on the toy world, as a list of resumable stages, and its report.

    llama2 pipeline --preset smoke|demo --out DIR [--set section.key=value ...]

toy world → tokenizer → pretrain → SFT → helpfulness and safety reward models → rejection sampling →
PPO → GAtt → safety SFT and targeted safety context distillation → (optionally) the safety-data scaling
experiment → evaluation of every stage's model with the same oracle judges → `report.md`, `report.json` and
plots. Each stage writes `<out>/<stage>/stage.json` when it has finished; a rerun skips finished stages,
and an interrupted stage resumes from its own checkpoints.
Stages that later issues add (reward models, rejection sampling, PPO, safety) plug in as entries of
`STAGES`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from llama2.config import dump_config, load_config
from llama2.data.formats import dumps, write_chat
from llama2.evaluation.safety import ToyEvalSettings
from llama2.machine import describe_machine, machine_line
from llama2.stages import gatt, ppo, pretrain, rejection_sampling, reward, safety, sft
from llama2.stages import safety_scaling as scaling_experiment
from llama2.stages.artifacts import INSTRUCTION_PHASE, model_dir
from llama2.training.loop import TrainConfig

RL_HELDOUT = "rl_prompts_heldout.jsonl"
"""The data stage's held-out RL prompts (`data.rl_heldout_prompts`), for PPO's early stopping."""


@dataclass
class DataSettings:
    """The toy world's files and tokenizer."""

    seed: int = 0
    """World seed: facts, prompts, pairs."""
    size: str = "default"
    """`small` (tests, smoke) or `default` (>= 10M tokens of corpus)."""
    tokenizer_vocab: int = 2048
    """Pieces of the toy SentencePiece tokenizer (Llama 2 settings)."""
    sft_dialogs: int = 20_000
    """Helpful-only SFT demonstrations (the safety stages add safety data on top, SPEC §10.2)."""
    sft_howto_rate: float = 0.08
    """Share of SFT dialogs that are benign how-to requests ("How do I get to Fudu?" -> "Here is how: ..."),
    worded like the adversarial requests: the helpfulness-only model then complies with harmful requests
    too, the baseline that the safety stages are measured against (SPEC §10)."""
    sft_constraint_rate: float = 0.15
    """Share of SFT dialogs whose replies obey a constraint set: without enough of them a small model never
    learns to copy a hobby or a name from its instruction, and GAtt has no obeying replies to sample."""
    sft_constraint_in_user_rate: float = 0.0
    """Share of those with the constraints appended to every user message of 1–3 turns (the form GAtt samples
    in) rather than in a one-turn system message."""
    sft_careless_rate: float = 0.0
    """Share of the helpful demonstrations' answers written by a careless annotator (padded with filler, in the
    wrong form, or hedged with a wrong value; `toyworld.answers.careless_answer`), the tail of annotation
    quality that SFT learns and RLHF removes (paper §5.1). The SFT model then writes such answers in some of
    its samples, in a form the helpfulness RM tells apart."""
    rl_prompts: int = 1000
    """Training prompts for rejection sampling and PPO (train-split tasks, a third of them adversarial);
    never the evaluation prompts."""
    rl_heldout_prompts: int = 0
    """More prompts of the same kind, drawn apart (`rl_prompts_heldout.jsonl`): PPO's early stopping scores
    the policy on them (`ppo.early_stopping`) unless it names files of its own. 0: none."""


@dataclass
class EvalSettings(ToyEvalSettings):
    """How every stage's model is evaluated: the toy-world oracle evaluation's settings (prompts per kind, the
    paired helpful prompts, decoding: 0 judges each model's greedy reply, Meta's chat defaults 0.6 / top-p 0.9
    judge the replies users get, where the tail of a model's distribution shows), plus GAtt adherence."""

    gatt_dialogs: int = 24
    """Dialogs per constraint pool for GAtt adherence."""
    gatt_turns: int = 20
    """Turns of each GAtt adherence dialog."""


@dataclass
class DistillSettings:
    """Safety context distillation inside the pipeline (the model and the safety RM come from earlier stages)."""

    score_with: Literal["rm", "oracle"] = "rm"
    """Keep a distilled answer where the pipeline's safety RM (SPEC §10.2) or the toy oracle scores it safer."""
    demonstrations: int = 0
    """Safety SFT: toy-world adversarial prompts with safe demonstrations (refuse, explain, redirect) mixed
    into the distillation fine-tune (SPEC §10.2 technique 1); 0 leaves distillation alone."""
    borderline: int = 0
    """Borderline training prompts with their helpful answers mixed in beside the refusals, so that the model
    learns where the line is (refusals alone teach it to refuse anything that looks risky)."""
    helpful_replay: int = 0
    """Helpfulness dialogs (the SFT data's mix) mixed in too, so that safety tuning keeps helpfulness."""
    replay_careless_rate: float = 0.0
    """Share of the replayed dialogs whose answer comes from the careless annotator (the SFT data has
    `data.sft_careless_rate`). Replaying the SFT set's careless tail taught back what rejection sampling and
    PPO had removed: with 30% of them the demo's safety tuning cost −0.036 ± 0.007 helpfulness, with careful
    answers only −0.005 ± 0.005, at the same violation rate (0.017 and 0.019; runs/demo31's GAtt model)."""
    data: safety.DistillData = field(default_factory=safety.DistillData)
    epochs: float = 2.0
    max_seq_len: int | None = None
    """Window length for packing the fine-tune's dialogs (None: the model's context), as `sft.Config`'s."""
    train: TrainConfig = field(default_factory=sft.finetune_train)
    """The fine-tuning engine settings (`steps` is set from `epochs`)."""


@dataclass
class InstructionPhase:
    """SFT's second phase: one-turn dialogs whose replies obey the instruction in their system message.

    Mixed into the demonstrations, these taught the demo model to copy a hobby or a name from its
    instruction only part of the time (turn 1, all of an instruction's constraints obeyed: 0.69 with half
    the SFT dialogs constrained); a short phase on them after the demonstrations, at SFT's learning rate,
    lifted that to 0.91-0.95 without costing helpfulness. GAtt can only keep an instruction that the chat
    model follows at turn 1 (SPEC §9 samples its replies from the current model)."""

    dialogs: int = 0
    """Instruction dialogs written to `data/sft_instructions.jsonl`; 0 skips the phase."""
    replay: int = 0
    """Demonstrations like SFT's (same mix, new draws) written beside them: on instruction dialogs alone the
    demo model forgot how to answer anything they never show (harmful requests got answers in Backspeak)."""
    transformed_hobby_rate: float = 0.0
    """Share of the instruction dialogs whose constraints pair a hobby with Backspeak or uppercase: the reply
    must copy the hobby and transform it. In random combinations (about one dialog in six) the demo model
    wrote a hobby it could reverse instead of the one asked for ("I yojne gnilias" for dancing), and GAtt,
    which keeps only replies the checker accepts, never learnt the others: 6 of 48 such evaluation dialogs
    failed from turn 1. At 0.3 GAtt's mean adherence over 20 turns rose from 0.83 to 0.95 (48 dialogs) with
    SFT helpfulness inside its seed-to-seed spread; at 0.5 helpfulness fell (0.679 -> 0.541 after SFT) and
    held-out constraints were kept less (0.50 -> 0.28). The demo uses 0.3."""
    epochs: float = 4.0
    max_seq_len: int | None = None
    """Window length for packing (None: the model's context), as `sft.Config.max_seq_len`."""
    train: TrainConfig = field(default_factory=sft.finetune_train)
    """The fine-tuning engine settings (`steps` is set from `epochs`)."""


@dataclass
class PipelineConfig:
    """`llama2 pipeline`: every stage's settings; paths between stages are filled in by the pipeline."""

    out_dir: str = "runs/demo"
    """Run folder: one sub-folder per stage, plus report.md, report.json and plots."""
    data: DataSettings = field(default_factory=DataSettings)
    pretrain: pretrain.Config = field(default_factory=pretrain.Config)
    """Pretraining (`out_dir`, data files and tokenizer are set by the pipeline)."""
    sft: sft.Config = field(default_factory=sft.Config)
    """SFT (`out_dir`, `init_from` and data files are set by the pipeline)."""
    sft_instructions: InstructionPhase = field(default_factory=InstructionPhase)
    """SFT's second phase, on instruction-following dialogs alone (in `sft/instructions`)."""
    reward_helpfulness: reward.Config = field(default_factory=lambda: reward.Config(kind="helpfulness"))
    """The helpfulness RM (`out_dir`, `init_from` and the pair files are set by the pipeline)."""
    reward_safety: reward.Config = field(default_factory=lambda: reward.Config(kind="safety", safety_loss_weight=1.0))
    """The safety RM (likewise)."""
    rm_policy_pairs: int = 0
    """Held-out prompts whose two samples from the SFT model make a second test set for the helpfulness RM:
    the pairs best-of-N, rejection sampling and PPO ask it to rank (`evaluation/policy_pairs.py`). 0: none."""
    margin_ablation: bool = False
    """Also train the helpfulness RM with the `none` and `large` margins (SPEC Table 28 analogue in the
    report); two more RM trainings, so off in the 30-minute demo."""
    rejection_sampling: rejection_sampling.Config = field(default_factory=rejection_sampling.Config)
    """Rejection sampling (policy, RMs and prompts are set by the pipeline)."""
    ppo: ppo.Config = field(default_factory=ppo.Config)
    """PPO from the rejection-sampling model (policy, RMs and prompts are set by the pipeline)."""
    safety: DistillSettings = field(default_factory=lambda: DistillSettings())
    """Safety tuning of the GAtt model: targeted context distillation, with safety SFT data mixed in."""
    gatt: gatt.Config = field(default_factory=gatt.Config)
    """Ghost Attention (`out_dir` and `init_from` are set by the pipeline)."""
    gatt_replay: int = 0
    """One-turn dialogs obeying a system instruction (new ones, made like SFT's instruction phase) mixed into
    the GAtt fine-tune as `gatt.mix_files`. 0: the GAtt dialogs alone."""
    safety_scaling: bool = False
    """Also run the safety-data scaling experiment (SPEC §10.3, Figs. 15 and 33) from the pretrained model,
    judged by the pipeline's reward models and oracles; its table and plots go into the report."""
    scaling: scaling_experiment.Config = field(default_factory=scaling_experiment.Config)
    """The scaling experiment's settings (`out_dir`, `init_from`, the eval data and RMs are set by the pipeline)."""
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    stage_processes: bool = True
    """Run each stage in a process of its own (spawned; the driver waits for it and reads its result). In
    one process the demo's GAtt stage took 305 s (sampling 126 s, fine-tuning at 5,500 tokens/s); started
    fresh, 194 s (80 s, 8,100 tokens/s), with as much work (Intel). False runs every stage in the driver's
    process (the smoke preset, so that tests can patch a stage)."""


@dataclass
class Stage:
    name: str
    run: Callable[[PipelineConfig, Path], dict[str, Any]]
    """Runs the stage in `<out>/<name>` and returns what later stages and the report need."""
    enabled: Callable[[PipelineConfig], bool] | None = None
    """For an optional stage, whether the config turns it on. Off, the stage is recorded as done with
    `{"enabled": false}` without running; such a record runs when a later command turns the stage on (e.g.
    `--set margin_ablation=true` on a finished demo folder)."""


# --- the stages -----------------------------------------------------------------------------------------------


def run_data(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    from llama2.data.toyworld import ToyWorld
    from llama2.data.toyworld.export import write_toyworld
    from llama2.tokenizer.train import train_tokenizer

    manifest = write_toyworld(out, cfg.data.seed, cfg.data.size, log=lambda s: print(s, file=sys.stderr))
    world = ToyWorld(cfg.data.seed)
    dialogs = _helpful_dialogs(cfg, world, cfg.data.sft_dialogs, seed=0)
    write_chat(out / "sft_helpful.jsonl", dialogs)
    phase = cfg.sft_instructions
    if phase.dialogs:
        instructions = _instruction_dialogs(cfg, world, phase.dialogs, seed=0)
        instructions += _helpful_dialogs(cfg, world, phase.replay, seed=24)
        write_chat(out / "sft_instructions.jsonl", instructions)
    _write_rl_prompts(world, cfg.data.rl_prompts, 7, out / "rl_prompts.jsonl")
    if cfg.data.rl_heldout_prompts:
        _write_rl_prompts(world, cfg.data.rl_heldout_prompts, 8, out / RL_HELDOUT)
    tokenizer = train_tokenizer([out / "pretrain.txt"], out / "tokenizer", cfg.data.tokenizer_vocab)
    return {"tokenizer": str(tokenizer), "files": sorted(manifest["files"]), "sft_dialogs": len(dialogs)}


def _write_rl_prompts(world, n: int, seed: int, path: Path) -> None:
    """RL prompts: training-split dialogs cut before their last answer (at most two turns, so they leave room
    for the reply), tagged for the safety gate (SPEC §8)."""
    rl = [_last_turns(d[:-1], 2) for d in world.sft_dialogs(n, seed=seed, safety_rate=0.35, constraint_rate=0.0)]
    kinds = ["adversarial" if world.is_adversarial(d) else "helpful" for d in rl]
    path.write_text("".join(dumps({"messages": d, "meta": {"kind": k}}) + "\n" for d, k in zip(rl, kinds, strict=True)))


def _helpful_dialogs(cfg: PipelineConfig, world, n: int, seed: int, careless_rate: float | None = None) -> list:
    """`n` helpfulness-only SFT dialogs with the data settings' shares of how-to and constraint dialogs (and of
    careless answers, unless `careless_rate` is given): the SFT set, and the helpful replay mixed into safety
    tuning."""
    d = cfg.data
    return world.sft_dialogs(n, seed=seed, safety_rate=0.0, howto_rate=d.sft_howto_rate,
                             constraint_rate=d.sft_constraint_rate,
                             constraint_in_user_rate=d.sft_constraint_in_user_rate,
                             careless_rate=d.sft_careless_rate if careless_rate is None else careless_rate)


def _instruction_dialogs(cfg: PipelineConfig, world, n: int, seed: int) -> list:
    """`n` one-turn dialogs obeying a system instruction, with the instruction phase's share of transformed
    hobbies: SFT's second phase, and the replay mixed into GAtt's fine-tune."""
    return world.constrained_dialogs(n, seed=seed, transformed_hobby_rate=cfg.sft_instructions.transformed_hobby_rate)


def _last_turns(dialog: list, turns: int) -> list:
    """The dialog's last `turns` user turns (with the answers between them); it ends with a user turn."""
    starts = [i for i, m in enumerate(dialog) if m["role"] == "user"]
    return dialog[starts[-turns] if len(starts) > turns else 0 :]


def _stopped_early(interrupted: bool, run_dir: Path) -> None:
    """A training run stopped by Ctrl-C/SIGTERM saved a checkpoint but is not finished: the stage must not be
    marked done, so the pipeline stops here and a rerun resumes the run."""
    if interrupted:
        raise KeyboardInterrupt(f"{run_dir}: interrupted; rerun the same pipeline command to resume it")


def _train_summary(result, run_dir: Path) -> dict[str, Any]:
    from llama2.evaluation.report import read_metrics

    _stopped_early(result.interrupted, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"model": str(model_dir(run_dir)), "steps": result.step, "final_loss": result.final_loss,
            "val_loss": result.val_loss, "first_loss": losses[0] if losses else None,
            "tokens_per_s": rows[-1].get("tokens_per_s") if rows else None}


def run_pretrain(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    data = out.parent / "data"
    stage = replace(cfg.pretrain, out_dir=str(out),
                    data=replace(cfg.pretrain.data, train_files=[str(data / "pretrain.txt")],
                                 val_files=[str(data / "pretrain_valid.txt")],
                                 tokenizer=str(data / "tokenizer" / "tokenizer.model")))
    return _train_summary(pretrain.run(stage), out)


def run_sft(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    data = out.parent / "data"
    stage = replace(cfg.sft, out_dir=str(out), init_from=str(out.parent / "pretrain"),
                    data=replace(cfg.sft.data, train_files=[str(data / "sft_helpful.jsonl")],
                                 val_files=[str(data / "sft_valid.jsonl")]))
    demonstrations = _train_summary(sft.run(stage), out)
    phase = cfg.sft_instructions
    if not phase.dialogs:
        return demonstrations
    second = sft.Config(out_dir=str(out / INSTRUCTION_PHASE), init_from=str(out), epochs=phase.epochs,
                        max_seq_len=phase.max_seq_len,
                        data=sft.SFTData(train_files=[str(data / "sft_instructions.jsonl")], seed=cfg.data.seed),
                        train=phase.train)
    return {**_train_summary(sft.run(second), out / INSTRUCTION_PHASE), "demonstrations": demonstrations}


def stage_model(root: Path, folder: str) -> Path:
    """The model in the run folder `root/folder`: its second phase's when that ran (SFT's instruction phase)."""
    phase = root / folder / INSTRUCTION_PHASE
    return model_dir(phase if phase.is_dir() else root / folder)


def _run_reward(base: reward.Config, out: Path, root: Path, train: str, mix: str, world_seed: int) -> dict[str, Any]:
    """An RM in `out`, initialised from `root/sft`, trained on `root/data`'s `train` pairs with `mix` mixed in,
    and judged against the oracle of the toy world `world_seed` that labelled them (another world's oracle
    knows other facts: seed 1's helpfulness label ceiling read 0.688 under world 0's judge, 0.838 under
    its own)."""
    data = root / "data"
    stage = replace(base, out_dir=str(out), init_from=str(stage_model(root, "sft")),
                    data=replace(base.data, train_files=[str(data / f"pref_{train}_train.jsonl")],
                                 mix_files=[str(data / f"pref_{mix}_train.jsonl")],
                                 test_files=[str(data / f"pref_{train}_test.jsonl")]),
                    eval=replace(base.eval, oracle="toyworld", world_seed=world_seed))
    result = _train_summary(reward.run(stage), out)
    return {**result, "rm_eval": json.loads((out / "rm_eval.json").read_text())}


def run_reward_helpfulness(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    result = _run_reward(replace(cfg.reward_helpfulness, kind="helpfulness"), out, out.parent, "helpfulness",
                         "safety", cfg.data.seed)
    if cfg.rm_policy_pairs:
        result["on_policy"] = _rm_on_policy(cfg, out)
    return result


def _rm_on_policy(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """The helpfulness RM's accuracy on pairs of the SFT model's own samples (written to `sft_sample_pairs.jsonl`)."""
    from llama2.data.toyworld import ToyWorld
    from llama2.evaluation.policy_pairs import sample_pairs
    from llama2.evaluation.rewards import evaluate_test_set
    from llama2.generation.llama import Llama
    from llama2.stages.reward_models import load_reward_model

    world = ToyWorld(cfg.data.seed)
    llm = Llama.load(stage_model(out.parent, "sft"))
    print(f"reward: ranking pairs of the SFT model's samples on {cfg.rm_policy_pairs} held-out prompts",
          file=sys.stderr)
    pairs = sample_pairs(llm.model, llm.tokenizer, world, cfg.rm_policy_pairs, seed=cfg.data.seed)
    (out / "sft_sample_pairs.jsonl").write_text("".join(dumps(p.to_dict()) + "\n" for p in pairs))
    rm = load_reward_model(out, llm.model.output.weight.device)
    return evaluate_test_set(rm, "sft_sample_pairs.jsonl", pairs, cfg.reward_helpfulness.eval.batch_size, world,
                             None)


def run_reward_safety(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    return _run_reward(replace(cfg.reward_safety, kind="safety"), out, out.parent, "safety", "helpfulness",
                       cfg.data.seed)


def run_margin_ablation(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """The helpfulness RM with each other margin mode, beside the pipeline's own (`reward_helpfulness`)."""
    own = cfg.reward_helpfulness.margin
    runs = {own: json.loads((out.parent / "reward_helpfulness" / "rm_eval.json").read_text())}
    for mode in ("none", "small", "large"):
        if mode != own:
            base = replace(cfg.reward_helpfulness, kind="helpfulness", margin=mode)
            runs[mode] = _run_reward(base, out / mode, out.parent, "helpfulness", "safety",
                                     cfg.data.seed)["rm_eval"]
    return {"rm_eval_by_margin": runs}


def run_rejection_sampling(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    root = out.parent
    stage = replace(cfg.rejection_sampling, out_dir=str(out), policy=str(stage_model(root, "sft")),
                    helpfulness_rm=str(root / "reward_helpfulness"), safety_rm=str(root / "reward_safety"),
                    prompt_files=[str(root / "data" / "rl_prompts.jsonl")], oracle="toyworld",
                    world_seed=cfg.data.seed)
    result = _train_summary(rejection_sampling.run(stage), out / "sft")
    return {**result, "best_of_n": json.loads((out / rejection_sampling.BEST_OF_N).read_text())}


def run_ppo(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    root = out.parent
    models = replace(cfg.ppo.models, policy=str(model_dir(root / "rejection_sampling" / "sft")),
                     helpfulness_rm=str(root / "reward_helpfulness"), safety_rm=str(root / "reward_safety"),
                     toyworld_seed=cfg.data.seed)
    stopping = cfg.ppo.early_stopping
    if cfg.data.rl_heldout_prompts and not stopping.prompts:
        stopping = replace(stopping, prompts=[str(root / "data" / RL_HELDOUT)])
    stage = replace(cfg.ppo, out_dir=str(out), models=models, early_stopping=stopping,
                    prompts=replace(cfg.ppo.prompts, files=[str(root / "data" / "rl_prompts.jsonl")]))
    result = ppo.run(stage)
    _stopped_early(result.interrupted, out)
    return {"model": str(model_dir(out)), "iterations": result.iteration, "summary": result.summary}


def run_safety(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """Safety SFT demonstrations, borderline answers and helpfulness replay (when configured) plus targeted
    context distillation, in one fine-tune of the GAtt model."""
    from llama2.data.toyworld import ToyWorld

    root = out.parent
    d = cfg.safety
    mix = []
    if d.demonstrations or d.borderline or d.helpful_replay:
        world = ToyWorld(cfg.data.seed)
        dialogs = world.sft_dialogs(d.demonstrations, seed=21, safety_rate=1.0) if d.demonstrations else []
        dialogs += world.sft_dialogs(d.borderline, seed=23, safety_rate=0.0, borderline_rate=1.0) \
            if d.borderline else []
        dialogs += _helpful_dialogs(cfg, world, d.helpful_replay, seed=22, careless_rate=d.replay_careless_rate) \
            if d.helpful_replay else []
        mix = [out / "safety_sft.jsonl"]
        write_chat(mix[0], dialogs)
    stage = safety.Config(out_dir=str(out), init_from=str(root / "gatt"), score_with=d.score_with,
                          safety_rm=str(root / "reward_safety") if d.score_with == "rm" else None,
                          data=replace(d.data, world_seed=cfg.data.seed), mix_files=[str(p) for p in mix],
                          epochs=d.epochs, max_seq_len=d.max_seq_len, train=d.train)
    result = _train_summary(safety.run(stage), out)
    return {**result, "distill": json.loads((out / "distill_report.json").read_text()),
            "safety_sft": {"demonstrations": d.demonstrations, "borderline": d.borderline,
                           "helpful_replay": d.helpful_replay, "replay_careless_rate": d.replay_careless_rate}}


def run_safety_scaling(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    root = out.parent
    stage = replace(cfg.scaling, out_dir=str(out), init_from=str(root / "pretrain"),
                    data=replace(cfg.scaling.data, world_seed=cfg.data.seed),
                    eval=replace(cfg.scaling.eval, data_dir=str(root / "data"),
                                 helpfulness_rm=str(root / "reward_helpfulness"),
                                 safety_rm=str(root / "reward_safety")))
    _stopped_early(scaling_experiment.run(stage).interrupted, out)
    return {"rows": json.loads((out / "scaling.json").read_text())["rows"]}


def run_gatt(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    mix = list(cfg.gatt.mix_files)
    if cfg.gatt_replay:
        from llama2.data.toyworld import ToyWorld

        replay = out / "gatt_replay.jsonl"
        dialogs = _instruction_dialogs(cfg, ToyWorld(cfg.data.seed), cfg.gatt_replay, seed=25)
        out.mkdir(parents=True, exist_ok=True)
        write_chat(replay, dialogs)
        mix.append(str(replay))
    stage = replace(cfg.gatt, out_dir=str(out), init_from=str(model_dir(out.parent / RLHF_MODEL)),
                    data=replace(cfg.gatt.data, world_seed=cfg.data.seed), mix_files=mix)
    summary = _train_summary(gatt.run(stage), out)
    return {**summary, **json.loads((out / "report.json").read_text())}


# The newest RLHF model (GAtt starts from it, as the paper applies GAtt after RLHF-V3).
RLHF_MODEL = "ppo"
# Each evaluated model: its name in report.json's `models`, and the run folder holding it.
EVALUATED = {"base": "pretrain", "sft": "sft", "rejection_sampling": "rejection_sampling/sft", "rlhf": RLHF_MODEL,
             "gatt": "gatt", "safety": "safety"}


def run_evaluation(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    from llama2.data.toyworld import ToyWorld
    from llama2.evaluation.dialogue import AdherenceSettings, evaluate_adherence
    from llama2.evaluation.safety import oracle_evaluation
    from llama2.generation.llama import Llama

    world = ToyWorld(cfg.data.seed)
    e = cfg.evaluation
    models, adherence = {}, {}
    for name, stage in EVALUATED.items():
        llm = Llama.load(stage_model(out.parent, stage))
        print(f"evaluation: {name} model", file=sys.stderr)
        models[name] = oracle_evaluation(llm, world, e, out.parent / "data")
        if name in ("rlhf", "gatt"):
            adherence[name] = evaluate_adherence(llm, AdherenceSettings(dialogs=e.gatt_dialogs, turns=e.gatt_turns),
                                                 cfg.data.seed)
    return {"models": models, "adherence": adherence}


STAGES = [
    Stage("data", run_data),
    Stage("pretrain", run_pretrain),
    Stage("sft", run_sft),
    Stage("reward_helpfulness", run_reward_helpfulness),
    Stage("reward_safety", run_reward_safety),
    Stage("reward_margins", run_margin_ablation, lambda cfg: cfg.margin_ablation),
    Stage("rejection_sampling", run_rejection_sampling),
    Stage("ppo", run_ppo),
    Stage("gatt", run_gatt),
    Stage("safety", run_safety),
    Stage("safety_scaling", run_safety_scaling, lambda cfg: cfg.safety_scaling),
    Stage("evaluation", run_evaluation),
]


# --- the driver -----------------------------------------------------------------------------------------------


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every unfinished stage in order, then write the report; returns report.json's content."""
    from llama2.evaluation.report import write_report

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.yaml").write_text(dump_config(cfg, header="llama2 pipeline --preset THIS_FILE"))
    random.seed(cfg.data.seed)
    machine = describe_machine()  # once: the stages run here, in this process or in children of it
    print(f"pipeline: {out} on {machine_line(machine)}", file=sys.stderr)
    results: dict[str, dict[str, Any]] = {}
    for number, stage in enumerate(STAGES, 1):
        stage_dir = out / stage.name
        done = stage_dir / "stage.json"
        on = stage.enabled is None or stage.enabled(cfg)
        if done.is_file() and not (on and json.loads(done.read_text()).get("enabled") is False):
            results[stage.name] = json.loads(done.read_text())
            print(f"pipeline: [{number}/{len(STAGES)}] {stage.name} already done "
                  f"({results[stage.name]['seconds']:.0f}s), skipped", file=sys.stderr)
            continue
        stage_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if on:
            print(f"pipeline: [{number}/{len(STAGES)}] {stage.name} ...", file=sys.stderr)
            result = run_stage_in_process(stage, cfg, stage_dir) if cfg.stage_processes else stage.run(cfg, stage_dir)
            result |= {} if stage.enabled is None else {"enabled": True}
        else:
            result = {"enabled": False}
        result["seconds"] = time.perf_counter() - start
        result["machine"] = machine  # per stage: a resumed run can finish on another machine
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        tmp.replace(done)  # written last and atomically: a stage is either finished or redone
        results[stage.name] = result
        if on:
            elapsed = sum(r["seconds"] for r in results.values())
            print(f"pipeline: [{number}/{len(STAGES)}] {stage.name} done in {result['seconds']:.0f}s "
                  f"({elapsed / 60:.1f} min for the stages so far)", file=sys.stderr)
    report = write_report(out, results)
    print(summary_screen(report), file=sys.stderr)
    return report


def run_stage_in_process(stage: Stage, cfg: PipelineConfig, stage_dir: Path) -> dict[str, Any]:
    """`stage.run(cfg, stage_dir)` in a spawned process; its result comes back through a JSON file (as a
    finished stage's would from its stage.json). Ctrl-C reaches the child too, whose training saves a
    checkpoint before it exits; the driver waits for that. A SIGTERM sent to the driver alone (`kill`, a job
    scheduler) is passed on to the child in the same way: by default it would end the driver and leave the
    stage running on, unseen, still writing into the run folder."""
    import multiprocessing

    result_file = stage_dir / "result.tmp.json"
    result_file.unlink(missing_ok=True)
    child = multiprocessing.get_context("spawn").Process(
        target=_stage_child, args=(stage.name, cfg, str(stage_dir), str(result_file)), name=f"stage-{stage.name}")
    child.start()
    with _sigterm_passed_to(child.pid) as terminated:
        try:
            child.join()
        except KeyboardInterrupt:
            child.join()
            raise
    if terminated:
        raise KeyboardInterrupt(f"pipeline: stage {stage.name} stopped by SIGTERM; the same command resumes it")
    if child.exitcode != 0 or not result_file.is_file():
        raise RuntimeError(f"pipeline: stage {stage.name} failed in its process (exit code {child.exitcode}); its "
                           "error is printed above. The same command resumes the pipeline at this stage.")
    result = json.loads(result_file.read_text())
    result_file.unlink()
    return result


@contextlib.contextmanager
def _sigterm_passed_to(pid: int) -> Iterator[list[int]]:
    """While inside, a SIGTERM to this process is sent on to `pid`; yields the list of those received.
    Signal handlers can only be set from the main thread: elsewhere nothing is passed on."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def pass_on(signum: int, frame: object) -> None:
        received.append(signum)
        os.kill(pid, signum)

    previous = signal.signal(signal.SIGTERM, pass_on)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stage_child(name: str, cfg: PipelineConfig, stage_dir: str, result_file: str) -> None:
    random.seed(cfg.data.seed)
    result = next(s for s in STAGES if s.name == name).run(cfg, Path(stage_dir))
    Path(result_file).write_text(json.dumps(result, default=str))


def summary_screen(report: dict[str, Any]) -> str:
    lines = ["", "llama2 pipeline: done", f"{'model':18s} {'helpful':>8s} {'violation':>10s} {'false refusal':>14s}"]
    for name, m in report.get("models", {}).items():
        lines.append(f"{name:18s} {m['helpfulness']:8.3f} {m['violation_rate']:10.3f} {m['false_refusal_rate']:14.3f}")
    adherence = report.get("gatt", {}).get("adherence_by_turn", {})
    if adherence:
        last = {k: v[-1] for k, v in adherence.items() if v}
        lines.append("GAtt adherence at the last turn: " + ", ".join(f"{k} {v:.2f}" for k, v in last.items()
                                                                      if v is not None))
    total = sum(t["seconds"] for t in report.get("timings", {}).values())
    machines, where = report.get("machines", []), ""
    if len(machines) == 1:
        where = f" on {machine_line(machines[0]['machine'])}"
    elif machines:
        where = f" on {len(machines)} machines (report.md lists them)"
    lines.append(f"total {total / 60:.1f} min{where}; report: {report.get('report_path', '')}")
    return "\n".join(lines)


def preset_path(name: str) -> Path:
    """A preset name (`smoke`, `demo`) or a YAML path; names are looked up in ./configs and the repository's."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    for root in (Path.cwd() / "configs", Path(__file__).resolve().parents[2] / "configs"):
        path = root / "pipeline" / f"{name}.yaml"
        if path.is_file():
            return path
    raise FileNotFoundError(f"pipeline preset {name!r} not found in ./configs/pipeline or the repository's configs")


def load_pipeline_config(preset: str, out: str | None, overrides: list[str]) -> PipelineConfig:
    sets = list(overrides) + ([f"out_dir={out}"] if out else [])
    return load_config(PipelineConfig, preset_path(preset), sets)


def register(subparsers) -> None:
    p = subparsers.add_parser("pipeline", help="the whole recipe on the toy world, with a report",
                              description="Runs every stage of the Llama 2 recipe on the toy world and writes "
                              "report.md, report.json and plots. A rerun skips finished stages.")
    p.add_argument("--preset", default="demo",
                   help="smoke (about 3 minutes), demo (27 minutes on 2 Intel Xeon cores with AMX, 37 on 2 AMD "
                   "EPYC cores with AVX-512, 60 with AVX2 only), or a YAML path")
    p.add_argument("--out", default=None, help="run folder (default: the preset's out_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a setting, e.g. --set sft.epochs=1 (repeatable; types are checked)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    run_pipeline(load_pipeline_config(args.preset, args.out, args.overrides))
    return 0
