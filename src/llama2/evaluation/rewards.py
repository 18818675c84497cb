"""Reward-model evaluation (SPEC §7 Tables 7-8, A.3.4, Fig. 27): `llama2 eval --task rm_accuracy`.

Per test set: accuracy per rating level and overall (a pair is right when r(chosen) > r(rejected), a tie
counts half, so an untrained zero-head RM scores 0.5); score histograms per rating level (the margin's
effect: a large margin pushes the distribution apart, even bimodal); for pairs with safety labels, the
recall of unsafe responses at score 0.5 (score = σ(r)); with the toy world's oracle, the correlation of the
RM's reward with the oracle score and the **label ceiling**: the accuracy the oracle judge itself gets on the
same noisy labels, the best any RM can show on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama2.data.formats import RATINGS, PreferenceRecord, read_preferences
from llama2.data.toyworld import is_refusal
from llama2.evaluation.options import int_option
from llama2.evaluation.paths import task_data
from llama2.evaluation.registry import EvalContext, task
from llama2.evaluation.scoring import sample_indices
from llama2.stages.reward_models import SAFETY_THRESHOLD, RewardModel, load_reward_model, sigmoid

UNSAFE_THRESHOLD = 0.5
"""A response scored below this (sigmoid scale) is flagged unsafe, as in the paper's A.3.4 recall."""


def pair_rewards(rm: RewardModel, records: Sequence[PreferenceRecord], batch_size: int = 16
                 ) -> tuple[list[float], list[float]]:
    """Raw rewards of the chosen and of the rejected responses, scored in one batched pass."""
    dialogs = [r.prompt for r in records] * 2
    responses = [r.chosen for r in records] + [r.rejected for r in records]
    rewards = rm.rewards(dialogs, responses, batch_size)
    return rewards[: len(records)], rewards[len(records):]


def _correct(chosen: float, rejected: float) -> float:
    return 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0


def accuracy_by_rating(records: Sequence[PreferenceRecord], chosen: Sequence[float],
                       rejected: Sequence[float]) -> dict[str, float]:
    """Accuracy per rating level present (Table 8's columns) and `overall`; unrated pairs (HH) count in overall."""
    hits: dict[str, list[float]] = {}
    for r, c, j in zip(records, chosen, rejected, strict=True):
        hits.setdefault(r.rating or "unrated", []).append(_correct(c, j))
    levels = [k for k in (*RATINGS, "unrated") if k in hits]
    out = {k: sum(hits[k]) / len(hits[k]) for k in levels}
    out["overall"] = sum(sum(v) for v in hits.values()) / max(1, len(records))
    return out


def counts_by_rating(records: Sequence[PreferenceRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.rating or "unrated"] = counts.get(r.rating or "unrated", 0) + 1
    return counts


def unsafe_recall(records: Sequence[PreferenceRecord], chosen: Sequence[float], rejected: Sequence[float],
                  threshold: float = UNSAFE_THRESHOLD) -> dict[str, float] | None:
    """Share of responses labelled unsafe whose score σ(r) is below `threshold` (`recall`), and share of those
    labelled safe that are below it too (`safe_flagged`); None without safety labels. The preference loss
    fixes only differences of r, so a safety RM can flag every unsafe response by scoring everything low:
    the second number tells that apart, and it is what PPO's 0.15 gate on helpful prompts reads."""
    flagged: dict[bool, list[bool]] = {True: [], False: []}
    for r, c, j in zip(records, chosen, rejected, strict=True):
        if r.safety is None:
            continue
        flagged[r.safety["chosen_safe"]].append(sigmoid(c) < threshold)
        flagged[r.safety["rejected_safe"]].append(sigmoid(j) < threshold)
    if not flagged[False]:
        return None
    safe = flagged[True]
    return {"recall": sum(flagged[False]) / len(flagged[False]), "unsafe_responses": len(flagged[False]),
            "safe_flagged": sum(safe) / len(safe) if safe else None, "safe_responses": len(safe),
            "threshold": threshold}


def oracle_pair_scores(world, records: Sequence[PreferenceRecord]) -> tuple[list[float], list[float]]:
    """The toy world's oracle scores of both responses: the safety judge for pairs with safety labels (the
    safety set was labelled by it), the helpfulness judge otherwise."""
    chosen, rejected = [], []
    for r in records:
        judge = world.safety if r.safety is not None else world.helpfulness
        chosen.append(judge(r.prompt, r.chosen))
        rejected.append(judge(r.prompt, r.rejected))
    return chosen, rejected


def agreement_by_pair_type(world, records: Sequence[PreferenceRecord], chosen: Sequence[float],
                           rejected: Sequence[float], oracle_chosen: Sequence[float],
                           oracle_rejected: Sequence[float]) -> dict[str, dict[str, float]]:
    """How often the RM orders a pair as the oracle does (not as the noisy label does), by what separates the
    two responses: `correctness` (the right name, number or lands in one and not the other), `form` (equally
    right, told apart by format or length), `refusal` (one of them refuses a benign prompt) and `safety` (an
    adversarial prompt). `oracle_chosen`/`oracle_rejected` are `oracle_pair_scores`; pairs the oracle scores
    equal are left out. The label ceiling mixes these kinds; this shows which one an RM misses: the demo's knows
    form and refusals, not which answer is right. `correctness` is split again by the prompt's task kind
    (`by_task`: fact, arith, yesno, ...), which tells whether one kind of question holds the gap or all do."""
    hits: dict[str, list[float]] = {}
    by_task: dict[str, list[float]] = {}
    for r, c, j, oc, oj in zip(records, chosen, rejected, oracle_chosen, oracle_rejected, strict=True):
        if oc == oj:
            continue
        sides = [world.judges.task_correctness(r.prompt, x) for x in (r.chosen, r.rejected)]
        hit = _correct(c, j) if oc > oj else _correct(j, c)
        if r.safety is not None or None in sides:
            kind = "safety"
        elif any(is_refusal(x) for x in (r.chosen, r.rejected)):
            kind = "refusal"
        elif sides[0][1] != sides[1][1]:
            kind = "correctness"
            by_task.setdefault(sides[0][0], []).append(hit)
        else:
            kind = "form"
        hits.setdefault(kind, []).append(hit)
    out = {k: _share(v) for k, v in sorted(hits.items())}
    if by_task:
        out["correctness"]["by_task"] = {k: _share(v) for k, v in sorted(by_task.items())}
    return out


def _share(hits: list[float]) -> dict[str, float]:
    return {"pairs": len(hits), "accuracy": sum(hits) / len(hits)}


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side is constant (or fewer than two points)."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def plot_score_histograms(records: Sequence[PreferenceRecord], chosen: Sequence[float], rejected: Sequence[float],
                          title: str, path: Path) -> Path:
    """One panel per rating level: histograms of σ(r) for chosen and rejected responses (cf. Fig. 27)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [k for k in (*RATINGS, None) if any(r.rating == k for r in records)]
    fig, axes = plt.subplots(1, len(levels), figsize=(3.2 * len(levels), 2.8), squeeze=False, sharey=False)
    bins = [i / 20 for i in range(21)]
    for ax, level in zip(axes[0], levels, strict=True):
        rows = [i for i, r in enumerate(records) if r.rating == level]
        ax.hist([sigmoid(chosen[i]) for i in rows], bins=bins, alpha=0.6, label="chosen")
        ax.hist([sigmoid(rejected[i]) for i in rows], bins=bins, alpha=0.6, label="rejected")
        ax.set_title(f"{(level or 'unrated').replace('_', ' ')} (n={len(rows)})", fontsize=9)
        ax.set_xlabel("score σ(r)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate_test_set(rm: RewardModel, name: str, records: Sequence[PreferenceRecord], batch_size: int,
                      world, out_dir: Path | None) -> dict[str, Any]:
    """Every metric of one test set (see the module docstring)."""
    chosen, rejected = pair_rewards(rm, records, batch_size)
    out: dict[str, Any] = {"pairs": len(records), "counts_by_rating": counts_by_rating(records),
                           "accuracy_by_rating": accuracy_by_rating(records, chosen, rejected)}
    recall = unsafe_recall(records, chosen, rejected)
    if recall is not None:
        out["unsafe_recall"] = recall
        out["flagged_at_gate"] = unsafe_recall(records, chosen, rejected, SAFETY_THRESHOLD)
    if world is not None:
        oracle_c, oracle_r = oracle_pair_scores(world, records)
        ceiling = accuracy_by_rating(records, oracle_c, oracle_r)
        out["label_ceiling"] = ceiling["overall"]
        out["label_ceiling_by_rating"] = ceiling
        out["oracle_correlation"] = pearson(chosen + rejected, oracle_c + oracle_r)
        out["agreement_with_oracle_by_pair_type"] = agreement_by_pair_type(world, records, chosen, rejected,
                                                                          oracle_c, oracle_r)
    if out_dir is not None:
        stem = name.split(".")[0]
        out["histogram"] = str(plot_score_histograms(records, chosen, rejected, f"{rm.path.name}: {name}",
                                                     out_dir / f"rm_scores_{stem}.png"))
    return out


def evaluate_reward_model(rm: RewardModel, test_sets: dict[str, Sequence[PreferenceRecord]], batch_size: int = 16,
                          world=None, out_dir: Path | None = None) -> dict[str, Any]:
    """Metrics per test set plus pair-weighted `accuracy` (the number the RM gate reads) over all of them."""
    per_set = {name: evaluate_test_set(rm, name, records, batch_size, world, out_dir)
               for name, records in test_sets.items() if records}
    if not per_set:
        raise ValueError("no test pairs to evaluate the reward model on")
    total = sum(s["pairs"] for s in per_set.values())
    out: dict[str, Any] = {
        "accuracy": sum(s["accuracy_by_rating"]["overall"] * s["pairs"] for s in per_set.values()) / total,
        "pairs": total, "test_sets": per_set,
    }
    if world is not None:
        out["label_ceiling"] = sum(s["label_ceiling"] * s["pairs"] for s in per_set.values()) / total
    return out


def _test_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted([*path.glob("*.jsonl"), *path.glob("*.jsonl.gz")])
    if not files:
        raise FileNotFoundError(f"{path}: no .jsonl or .jsonl.gz preference files in this folder")
    return files


@task("rm_accuracy")
def rm_accuracy(ctx: EvalContext) -> dict[str, Any]:
    """Reward-model accuracy per rating level on preference pairs (--option oracle=toyworld for the ceiling)."""
    files = _test_files(task_data(ctx.data, "hh-rlhf", "helpful-base", "test.jsonl.gz"))
    test_sets = {}
    for f in files:
        records = [r for r in read_preferences(f) if "identical" not in r.notes]
        test_sets[f.name] = [records[i] for i in sample_indices(len(records), ctx.limit, ctx.seed)]
    world = None
    oracle = ctx.options.get("oracle", "")
    if oracle == "toyworld":
        from llama2.data.toyworld import ToyWorld

        world = ToyWorld(int_option(ctx, "world_seed", 0))
    elif oracle:
        raise ValueError(f"--option oracle= expects 'toyworld' (or nothing), got {oracle!r}")
    rm = load_reward_model(ctx.model_dir, device=ctx.device)
    return evaluate_reward_model(rm, test_sets, ctx.batch_size, world, ctx.out_dir)
