"""Safety SFT and the safety-data scaling experiment (SPEC §10.2 technique 1, §10.3, Figs. 15 and 33).

Supervised safety fine-tuning mixes adversarial prompts with safe demonstrations into the SFT data. The
paper's ablation asks what more safety data buys and costs: with the helpfulness data fixed, fine-tune the
same starting model on 0, 1, 10, 25, 50 and 100% of the safety demonstrations, then measure each model.
`llama2 safety-scaling --config FILE`, step by step:
 1. make the fixed helpfulness dialogs and the full safety set (toy-world adversarial prompts with safe
    refusals), or read them from chat jsonl files;
 2. for each fraction, mix the first `round(fraction × len(safety))` safety dialogs (nested subsets, so a
    larger fraction only adds data) into the helpfulness dialogs and fine-tune through `sft.run`;
 3. evaluate each model: the toy-world oracle evaluation (violation rate, false refusals on the helpful
    and borderline sets, oracle helpfulness) and, when reward models are given, the mean safety-RM score
    of its answers to adversarial prompts and the mean helpfulness-RM score of its answers to helpful ones;
 4. write `scaling.json`, `scaling.md`, `scaling_scores.png` (Fig. 15) and `false_refusal.png` (Fig. 33).
Each fraction's run lives in `frac_<percent>/`; a finished evaluation (`eval.json`) is not redone.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llama2.data.formats import Message, read_chat, write_chat
from llama2.data.toyworld import ToyWorld
from llama2.evaluation.safety import ToyEvalSettings, load_prompts, oracle_evaluation
from llama2.generation.llama import Llama
from llama2.stages import sft
from llama2.stages.artifacts import model_dir
from llama2.stages.safety import generate_replies
from llama2.training.loop import TrainConfig, TrainResult

FRACTIONS = [0.0, 0.01, 0.1, 0.25, 0.5, 1.0]
"""The paper's safety-data fractions."""


@dataclass
class ScalingData:
    """The fixed helpfulness data and the safety demonstrations that are scaled."""

    helpful_dialogs: int = 400
    """Toy-world helpfulness dialogs (no safety demonstrations), fixed across fractions."""
    safety_dialogs: int = 100
    """Toy-world safety demonstrations (adversarial prompt + safe refusal) at 100%."""
    helpful_file: str | None = None
    """Chat jsonl of helpfulness dialogs to use instead of the toy world's."""
    safety_file: str | None = None
    """Chat jsonl of safety demonstrations to use instead of the toy world's."""
    fractions: list[float] = field(default_factory=lambda: list(FRACTIONS))
    """Shares of the safety set mixed in, one fine-tuning run each."""
    world_seed: int = 0
    """The toy world that makes the data and judges the answers."""
    seed: int = 0
    """Seed of the generated dialogs and of the SFT data order."""


@dataclass
class ScalingEval(ToyEvalSettings):
    """How each fine-tuned model is measured: the toy-world oracle evaluation's settings (prompts per kind,
    decoding: greedy by default, or `samples_per_prompt` replies at `temperature` / `top_p`, for the RM columns
    and the oracle alike), plus where the prompts and reward models come from."""

    data_dir: str | None = None
    """Folder with `eval_{helpful,adversarial,borderline}.jsonl` (`llama2 data toyworld`); None: fresh
    held-out prompts from the world seed."""
    helpfulness_rm: str | None = None
    """Helpfulness reward model (model or run directory); None: no helpfulness-RM column."""
    safety_rm: str | None = None
    """Safety reward model (model or run directory); None: no safety-RM column."""


@dataclass
class Config:
    """`llama2 safety-scaling`: a starting model, the data, one SFT setting shared by all fractions."""

    out_dir: str = "runs/safety-scaling"
    """Experiment folder: `helpful.jsonl`, `safety.jsonl`, `frac_<percent>/` runs and the tables and plots."""
    init_from: str = ""
    """The model every fraction fine-tunes from (the paper: pretrained Llama 2)."""
    data: ScalingData = field(default_factory=ScalingData)
    """The data to mix."""
    eval: ScalingEval = field(default_factory=ScalingEval)
    """The measurements."""
    epochs: float = 2.0
    """Passes over each mixed set (SPEC §10.3: 2)."""
    train: TrainConfig = field(default_factory=sft.finetune_train)
    """The fine-tuning engine settings, the same for every fraction (`steps` is set from `epochs`)."""

    def __post_init__(self) -> None:
        bad = [f for f in self.data.fractions if not 0.0 <= f <= 1.0]
        if not self.data.fractions:
            raise ValueError("safety-scaling: data.fractions is empty")
        if bad:
            raise ValueError(f"safety-scaling: data.fractions must lie in [0, 1], got {bad}")


def safety_count(fraction: float, total: int) -> int:
    """How many safety demonstrations a fraction takes: rounded, but at least one for a positive fraction."""
    return max(1, round(fraction * total)) if fraction > 0 and total else 0


def mix(helpful: list[list[Message]], safety: list[list[Message]], fraction: float) -> list[list[Message]]:
    """Step 2: every helpfulness dialog plus the first `safety_count(fraction)` safety demonstrations."""
    return helpful + safety[: safety_count(fraction, len(safety))]


def fraction_name(fraction: float) -> str:
    """`frac_010` for 10%; 1% is `frac_001`."""
    return f"frac_{round(fraction * 100):03d}"


def _dialogs(path: str | None, make) -> list[list[Message]]:
    return [r.messages for r in read_chat(path, last_role="assistant")] if path else make()


def build_data(cfg: ScalingData, world: ToyWorld) -> tuple[list[list[Message]], list[list[Message]]]:
    """Step 1: the fixed helpfulness dialogs and the full safety set."""
    helpful = _dialogs(cfg.helpful_file, lambda: world.sft_dialogs(cfg.helpful_dialogs, seed=cfg.seed,
                                                                    safety_rate=0.0))
    safety = _dialogs(cfg.safety_file, lambda: world.sft_dialogs(cfg.safety_dialogs, seed=cfg.seed + 1,
                                                                  safety_rate=1.0))
    return helpful, safety


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def reward_scores(llm: Llama, world: ToyWorld, ev: ScalingEval) -> dict[str, float | None]:
    """Step 3's RM columns: mean safety-RM score on adversarial prompts, helpfulness-RM on helpful ones (over
    every reply, decoded as the oracle columns are)."""
    from llama2.stages.reward_models import load_reward_model

    prompts = load_prompts(world, ev, Path(ev.data_dir) if ev.data_dir else None)
    out: dict[str, float | None] = {"safety_rm": None, "helpfulness_rm": None}
    for key, path, kind in (("safety_rm", ev.safety_rm, "adversarial"), ("helpfulness_rm", ev.helpfulness_rm,
                                                                          "helpful")):
        if path:
            dialogs = [m for m, _ in prompts[kind] for _ in range(ev.replies_per_prompt)]
            replies = generate_replies(llm, dialogs, ev.max_gen_len, ev.temperature, ev.top_p, ev.batch_size, 0,
                                       f"scaling: {kind}")
            out[key] = _mean(load_reward_model(path).score(dialogs, replies, ev.batch_size))
    return out


def evaluate(model: Path, world: ToyWorld, ev: ScalingEval) -> dict:
    """Step 3 for one fine-tuned model."""
    llm = Llama.load(model)
    oracle = oracle_evaluation(llm, world, ev, Path(ev.data_dir) if ev.data_dir else None)
    return {**reward_scores(llm, world, ev), **oracle}


COLUMNS = (("safety_rm", "mean safety RM"), ("helpfulness_rm", "mean helpfulness RM"),
           ("helpfulness", "oracle helpfulness"), ("violation_rate", "violation rate"),
           ("false_refusal_rate", "false refusal (helpful)"),
           ("borderline_false_refusal_rate", "false refusal (borderline)"))


def _cell(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def table_lines(rows: list[dict]) -> list[str]:
    """The Markdown table of the rows (also embedded in the pipeline's report)."""
    head = "| safety data | safety dialogs | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = " | ".join(_cell(r.get(key)) for key, _ in COLUMNS)
        lines.append(f"| {r['fraction']:.0%} | {r['safety_dialogs']} | {cells} |")
    return lines


def write_table(rows: list[dict], out: Path, notes: list[str]) -> None:
    """Step 4: `scaling.json` and `scaling.md`."""
    (out / "scaling.json").write_text(json.dumps({"rows": rows, "notes": notes}, indent=2) + "\n")
    lines = ["# Safety-data scaling (SPEC Fig. 15, Fig. 33)", "", *table_lines(rows)]
    lines += [""] + [f"- {n}" for n in notes]
    (out / "scaling.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], out: Path) -> None:
    """Step 4: scores against safety-data share (Fig. 15) and false refusals (Fig. 33)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    labels = [f"{r['fraction']:.0%}" for r in rows]
    figures = (("scaling_scores.png", ("safety_rm", "helpfulness_rm", "helpfulness", "violation_rate"),
                "score / rate", "Safety-data scaling"),
               ("false_refusal.png", ("false_refusal_rate", "borderline_false_refusal_rate"), "false-refusal rate",
                "False refusals vs safety data"))
    names = dict(COLUMNS)
    for filename, keys, ylabel, title in figures:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            ys = [r.get(key) for r in rows]
            if all(y is not None for y in ys):
                ax.plot(x, ys, marker="o", label=names[key])
        ax.set_xticks(x, labels)
        ax.set_xlabel("share of safety demonstrations")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / filename, dpi=120)
        plt.close(fig)


def run(cfg: Config) -> TrainResult:
    """Fine-tune and evaluate one model per fraction (resumable), then write the table and plots."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = ToyWorld(cfg.data.world_seed)
    source = model_dir(cfg.init_from)
    # 1. fixed helpfulness data, full safety set
    helpful, safety = build_data(cfg.data, world)
    write_chat(out / "helpful.jsonl", helpful)
    write_chat(out / "safety.jsonl", safety)
    rows, result = [], None
    for fraction in cfg.data.fractions:
        run_dir = out / fraction_name(fraction)
        run_dir.mkdir(exist_ok=True)
        # 2. mix and fine-tune from the same starting model
        mixed = mix(helpful, safety, fraction)
        train_file = run_dir / "train.jsonl"
        write_chat(train_file, mixed)
        result = sft.run(sft.Config(out_dir=str(run_dir), init_from=str(source), epochs=cfg.epochs,
                                    data=sft.SFTData(train_files=[str(train_file)], seed=cfg.data.seed),
                                    train=cfg.train))
        if result.interrupted:
            return result
        # 3. evaluate (once)
        eval_file = run_dir / "eval.json"
        if not eval_file.is_file():
            eval_file.write_text(json.dumps(evaluate(model_dir(run_dir), world, cfg.eval), indent=2) + "\n")
        metrics = json.loads(eval_file.read_text())
        rows.append({"fraction": fraction, "safety_dialogs": len(mixed) - len(helpful),
                     "helpful_dialogs": len(helpful), "model": str(model_dir(run_dir)), **metrics})
        print(f"safety-scaling: {fraction:.0%} safety data: violation rate {metrics['violation_rate']:.3f}, "
              f"false refusal {metrics['false_refusal_rate']:.3f} / borderline "
              f"{metrics['borderline_false_refusal_rate']:.3f}", file=sys.stderr)
    # 4. table and plots
    notes = [f"helpfulness data fixed at {len(helpful)} dialogs; safety set {len(safety)} dialogs at 100%",
             f"every fraction fine-tuned from {source} for {cfg.epochs:g} epochs",
             f"oracle metrics on the toy world (seed {cfg.data.world_seed}), {cfg.eval.prompts} prompts per kind"]
    if not (cfg.eval.safety_rm or cfg.eval.helpfulness_rm):
        notes.append("no reward models given (eval.safety_rm / eval.helpfulness_rm): RM columns skipped")
    notes.append(f"settings: {json.dumps(asdict(cfg.eval))}")
    write_table(rows, out, notes)
    plot(rows, out)
    print(f"safety-scaling: table in {out / 'scaling.md'}", file=sys.stderr)
    assert result is not None  # __post_init__ rejects an empty fraction list
    return result
