"""Safety context distillation (SPEC §10.2, technique 3): `llama2 distill --config FILE`.

A chat model answers adversarial prompts more safely when a safety preprompt precedes them; distillation
bakes that behaviour into the model so that it needs no preprompt. Step by step:
 1. take adversarial prompts (a chat jsonl ending with a user turn, or fresh toy-world training prompts)
    and their risk category (the record's `meta.category`, or the toy world's classifier);
 2. answer each prompt three times with the current model: without a preprompt, with the generic
    preprompt, and with its category's answer-template preprompt (both given as a system message);
 3. score every answer for safety on the prompt *without* the preprompt, with the safety reward model
    (`score_with: rm`) or, for toy-world runs without a reward model, the toy world's safety judge
    (`score_with: oracle`; recorded as such in the report);
 4. targeted distillation: keep the distilled answer only where it scores above the answer without the
    preprompt (the paper keeps it only where the Safety RM prefers it, which avoids the vague answers and
    false refusals that a preprompt can cause);
 5. fine-tune on the kept (prompt without preprompt, distilled answer) pairs through the SFT path, together
    with any `mix_files` (safety SFT demonstrations, helpfulness replay).
`distill_report.json` records the share kept and the safety-score distributions for the three conditions
(SPEC Fig. 16a), `distill_scores.png` draws them.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from llama2.data.formats import Message, dumps, read_chat, write_chat
from llama2.data.toyworld import ToyWorld
from llama2.data.toyworld.dialogs import sample_adversarial
from llama2.generation.llama import Llama
from llama2.stages import sft
from llama2.stages.artifacts import model_dir
from llama2.tokenizer.chat_format import encode_dialog
from llama2.training.loop import TrainConfig, TrainResult

GENERIC_PREPROMPT = (
    "The following is a talk between a person and a wise, responsible and respectful assistant. "
    "The assistant is kind and honest, and it keeps everyone safe. It never helps anyone steal, hurt or "
    "insult others, and it never gives risky advice. When a request could hurt someone, it says no, says "
    "why, and offers a safe way to help instead."
)
"""The generic safety preprompt (the paper's "…a knowledgeable and empathetic assistant…"), built from
"safe" adjectives, in the toy world's plain language."""

TEMPLATE_PREPROMPTS = {
    "illicit": (
        "You are a responsible and law-abiding assistant. The next request may ask for help with a crime, such "
        "as stealing, forging a seal, poisoning, smuggling or breaking in. Answer in this order: first say "
        "that you can't help with it; then say why, because it is against the law or it would hurt other "
        "people; then offer an honest thing to do instead, such as honest work or help from the court."
    ),
    "hateful": (
        "You are a respectful and fair assistant. The next request may ask you to insult, mock or look down on "
        "a people or a guild. Answer in this order: first say that you can't help with it; then say why, "
        "because every group deserves respect and hurtful words cause real harm; then offer something kind "
        "instead, such as a kind fact about that land or what its people like to eat."
    ),
    "advice": (
        "You are a careful and wise assistant, not a healer or a money advisor. The next request may ask for "
        "risky advice about herbs, wounds, fevers or betting savings. Answer in this order: first say that you "
        "can't help with it; then say why, because you are not a trained healer or advisor and only an expert "
        "can judge this safely; then tell the person to visit a healer or ask an expert instead."
    ),
}
"""One answer-template preprompt per toy-world risk category (SPEC §10.2: address the safety concern →
refuse and explain the risk → offer a safe alternative)."""

CONDITIONS = ("none", "generic", "template")
"""The three answers per prompt: without a preprompt, with the generic one, with the category template."""


def preprompt_for(condition: str, category: str | None) -> str | None:
    """The system message of a condition; a prompt of unknown category gets the generic one as template."""
    if condition == "none":
        return None
    if condition == "template" and category in TEMPLATE_PREPROMPTS:
        return TEMPLATE_PREPROMPTS[category]
    return GENERIC_PREPROMPT


def with_preprompt(messages: Sequence[Message], preprompt: str | None) -> list[Message]:
    """The dialog with `preprompt` as its system message (replacing any system message it had)."""
    rest = [m for m in messages if m["role"] != "system"]
    return ([{"role": "system", "content": preprompt}] if preprompt else []) + rest


def targeted_selection(base: Sequence[float], distilled: Sequence[float]) -> list[bool]:
    """Step 4: keep a distilled answer only where its safety score is strictly above the base answer's."""
    if len(base) != len(distilled):
        raise ValueError(f"{len(base)} base scores but {len(distilled)} distilled scores")
    return [d > b for b, d in zip(base, distilled, strict=True)]


def generate_replies(llm: Llama, dialogs: Sequence[Sequence[Message]], max_gen_len: int, temperature: float,
                     top_p: float, batch_size: int, seed: int, desc: str = "generating") -> list[str]:
    """Replies to `dialogs` in batches; batch k uses seed `seed + k`, so equal settings give equal replies."""
    replies: list[str] = []
    for k, start in enumerate(tqdm(range(0, len(dialogs), batch_size), desc=desc, file=sys.stderr, leave=False)):
        out = llm.chat_completion(list(dialogs[start : start + batch_size]), temperature=temperature, top_p=top_p,
                                  max_gen_len=max_gen_len, seed=seed + k)
        replies += [r["generation"]["content"].strip() for r in out]
    return replies


def score_summary(scores: Sequence[float]) -> dict[str, float | int]:
    """Mean, quartiles and extremes of a score list (the box of Fig. 16a)."""
    if not scores:
        return {"n": 0}
    q = statistics.quantiles(scores, n=4, method="inclusive") if len(scores) > 1 else [scores[0]] * 3
    return {"n": len(scores), "mean": statistics.fmean(scores), "median": q[1], "q1": q[0], "q3": q[2],
            "min": min(scores), "max": max(scores)}


@dataclass
class DistillData:
    """The adversarial prompts and how they are answered."""

    prompts_file: str | None = None
    """Chat jsonl ending with a user turn (`meta.category` optional), e.g. a toy world's adversarial set;
    None: `prompts` fresh toy-world training prompts (never the held-out evaluation ones)."""
    prompts: int = 64
    """How many prompts to use (the first ones of the file, or this many toy-world prompts)."""
    world_seed: int = 0
    """The toy world that supplies prompts, categories and, with `score_with: oracle`, the safety judge."""
    distill_with: Literal["template", "generic"] = "template"
    """Which preprompted answer is distilled: the category template (the generic preprompt where the
    category is unknown) or always the generic preprompt."""
    targeted: bool = True
    """Keep a distilled answer only where it scores above the answer without a preprompt (step 4);
    False keeps every distilled answer (plain context distillation)."""
    temperature: float = 0.6
    top_p: float = 0.9
    max_gen_len: int = 64
    """Longest answer, in tokens."""
    batch_size: int = 16
    """Prompts per generation batch."""
    seed: int = 0
    """Seed of the toy-world prompts, the sampling and the SFT data order."""


@dataclass
class Config:
    """`llama2 distill`: a chat model, adversarial prompts, a safety scorer and the fine-tuning settings."""

    out_dir: str = "runs/distill"
    """Run folder: `distill_answers.jsonl`, `distill_train.jsonl`, `distill_report.json`, `distill_scores.png`
    and the fine-tuning run (its model: `model_dir(out_dir)`)."""
    init_from: str = ""
    """The chat model that answers the prompts and is fine-tuned (model or run directory)."""
    score_with: Literal["rm", "oracle"] = "rm"
    """Safety scorer: the safety reward model in `safety_rm`, or the toy world's safety judge."""
    safety_rm: str | None = None
    """Safety reward model (model or run directory); required by `score_with: rm`."""
    data: DistillData = field(default_factory=DistillData)
    """The prompts and the answering settings."""
    mix_files: list[str] = field(default_factory=list)
    """Chat jsonl fine-tuned on together with the kept answers: safety SFT demonstrations (adversarial
    prompts with safe answers, SPEC §10.2 technique 1) and helpfulness replay, so that one fine-tune does
    safety SFT and targeted distillation without forgetting helpfulness."""
    epochs: float = 2.0
    """Passes over the distilled examples (and the mixed-in files)."""
    max_seq_len: int | None = None
    """Window length for packing the fine-tune's dialogs (None: the model's context), as `sft.Config`'s."""
    train: TrainConfig = field(default_factory=sft.finetune_train)
    """The fine-tuning engine settings (`steps` is set from `epochs`)."""

    def __post_init__(self) -> None:
        if self.score_with == "rm" and not self.safety_rm:
            raise ValueError("distill: score_with: rm needs safety_rm (a safety reward model directory); for a "
                             "toy-world run without one set score_with: oracle")


@dataclass
class DistillPrompt:
    messages: list[Message]
    """The adversarial dialog, ending with a user turn, without any preprompt."""
    category: str | None
    """Its risk category, None when unknown (then the generic preprompt serves as the template)."""


def load_prompts(cfg: DistillData, world: ToyWorld) -> list[DistillPrompt]:
    """Step 1: the prompts with their categories (from the record, else the toy world's classifier)."""
    if cfg.prompts_file is None:
        rng = random.Random(f"distill-{cfg.seed}")
        out = []
        for _ in range(cfg.prompts):
            text, attack = sample_adversarial(world, rng, "train")
            out.append(DistillPrompt([{"role": "user", "content": text}], attack.category))
        return out
    out = []
    for record in read_chat(cfg.prompts_file, last_role="user")[: cfg.prompts]:
        category = record.meta.get("meta", {}).get("category") or record.meta.get("category")
        if category is None:
            attack = world.rules.classify(record.messages[-1]["content"])
            category = attack.category if attack else None
        out.append(DistillPrompt(list(record.messages), category))
    return out


def fits_context(llm: Llama, dialog: Sequence[Message], max_gen_len: int) -> bool:
    """Does the dialog leave room for `max_gen_len` answer tokens in the model's context?"""
    return len(encode_dialog(llm.tokenizer, dialog)) + max_gen_len <= llm.args.max_seq_len


def answer_and_score(cfg: Config, llm: Llama, prompts: list[DistillPrompt], world: ToyWorld
                     ) -> tuple[list[DistillPrompt], dict[str, list[str]], dict[str, list[float]]]:
    """Steps 2-3: answers and safety scores per condition, for the prompts whose longest form fits."""
    d = cfg.data
    fitting = [p for p in prompts if all(fits_context(llm, with_preprompt(p.messages, preprompt_for(c, p.category)),
                                               d.max_gen_len) for c in CONDITIONS)]
    if len(fitting) < len(prompts):
        print(f"distill: {len(prompts) - len(fitting)} prompt(s) left out: with a preprompt they do not fit the "
              f"model's {llm.args.max_seq_len}-token context", file=sys.stderr)
    if not fitting:
        raise ValueError(f"distill: no prompt fits the model's {llm.args.max_seq_len}-token context with a "
                         "preprompt and a reply (use a longer context or a smaller data.max_gen_len)")
    answers = {c: generate_replies(llm, [with_preprompt(p.messages, preprompt_for(c, p.category)) for p in fitting],
                                   d.max_gen_len, d.temperature, d.top_p, d.batch_size, d.seed, f"distill: {c}")
               for c in CONDITIONS}
    bare = [p.messages for p in fitting]
    if cfg.score_with == "oracle":
        scores = {c: [world.safety(m, a) for m, a in zip(bare, answers[c], strict=True)] for c in CONDITIONS}
    else:
        from llama2.stages.reward_models import load_reward_model

        rm = load_reward_model(cfg.safety_rm)
        scores = {c: rm.score(bare, answers[c], d.batch_size) for c in CONDITIONS}
    return fitting, answers, scores


def build_report(cfg: Config, prompts: list[DistillPrompt], scores: dict[str, list[float]],
                 keep: list[bool]) -> dict:
    """The share kept and the score distributions, overall and per category (Fig. 16a)."""
    distilled = "template" if cfg.data.distill_with == "template" else "generic"
    categories = sorted({p.category or "unknown" for p in prompts})
    by_category = {}
    for cat in categories:
        idx = [i for i, p in enumerate(prompts) if (p.category or "unknown") == cat]
        by_category[cat] = {"prompts": len(idx), "kept": sum(keep[i] for i in idx),
                            **{f"median_{c}": score_summary([scores[c][i] for i in idx]).get("median")
                               for c in CONDITIONS}}
    return {
        "scorer": "oracle (toy-world safety judge)" if cfg.score_with == "oracle" else f"rm:{cfg.safety_rm}",
        "distilled_condition": distilled,
        "targeted": cfg.data.targeted,
        "prompts": len(prompts),
        "kept": sum(keep),
        "share_kept": sum(keep) / len(keep) if keep else 0.0,
        "improved": sum(targeted_selection(scores["none"], scores[distilled])),
        "scores": {c: score_summary(scores[c]) for c in CONDITIONS},
        "by_category": by_category,
    }


def plot_scores(scores: dict[str, list[float]], path: Path, scorer: str) -> None:
    """Fig. 16a analogue: the safety-score distribution of each condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.boxplot([scores[c] for c in CONDITIONS], tick_labels=["no preprompt", "generic", "template"])
    ax.set_ylabel(f"safety score ({scorer})")
    ax.set_title("Context distillation: safety scores by preprompt")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: Config) -> TrainResult:
    """Answer, score and select (once per run folder), then fine-tune on the kept answers (resumable)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_file, report_file = out / "distill_train.jsonl", out / "distill_report.json"
    source = model_dir(cfg.init_from)
    if not report_file.is_file():
        # 1-3. prompts, three answers each, safety scores on the prompt without the preprompt
        world = ToyWorld(cfg.data.world_seed)
        llm = Llama.load(source)
        prompts, answers, scores = answer_and_score(cfg, llm, load_prompts(cfg.data, world), world)
        del llm
        # 4. targeted selection
        distilled = "template" if cfg.data.distill_with == "template" else "generic"
        keep = (targeted_selection(scores["none"], scores[distilled]) if cfg.data.targeted
                else [True] * len(prompts))
        rows = [{"messages": p.messages, "category": p.category, "kept": k,
                 **{f"answer_{c}": answers[c][i] for c in CONDITIONS},
                 **{f"score_{c}": scores[c][i] for c in CONDITIONS}}
                for i, (p, k) in enumerate(zip(prompts, keep, strict=True))]
        (out / "distill_answers.jsonl").write_text("".join(dumps(r) + "\n" for r in rows))
        examples = [p.messages + [{"role": "assistant", "content": answers[distilled][i]}]
                    for i, (p, k) in enumerate(zip(prompts, keep, strict=True)) if k and answers[distilled][i]]
        if not examples:
            raise ValueError("distill: no distilled answer scored above the answer without a preprompt; nothing "
                             "to fine-tune on (use more prompts, or data.targeted: false)")
        write_chat(train_file, examples)
        report = build_report(cfg, prompts, scores, keep)
        plot_scores(scores, out / "distill_scores.png", report["scorer"])
        report_file.write_text(json.dumps(report, indent=2) + "\n")
        medians = ", ".join(f"{c} {report['scores'][c]['median']:.3f}" for c in CONDITIONS)
        print(f"distill: kept {report['kept']} of {report['prompts']} distilled answers "
              f"({report['share_kept']:.0%}); median safety score {medians} [{report['scorer']}]", file=sys.stderr)
    # 5. fine-tune on the kept answers, the prompts without the preprompt (plus any mixed-in data)
    finetune = sft.Config(out_dir=str(out), init_from=str(source), epochs=cfg.epochs, max_seq_len=cfg.max_seq_len,
                          data=sft.SFTData(train_files=[str(train_file), *cfg.mix_files], seed=cfg.data.seed),
                          train=cfg.train)
    return sft.run(finetune)
