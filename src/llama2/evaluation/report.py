"""The pipeline's report: `report.json` (DESIGN §4 keys), `report.md` with tables, and PNG plots.

Where the toy world does not reproduce a paper result, the report says so next to the number (the
`checks` list compares each measured effect with what the paper reports).
"""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen first)

from llama2.evaluation.scoring import paired_difference  # noqa: E402
from llama2.machine import machine_line  # noqa: E402
from llama2.stages.artifacts import INSTRUCTION_PHASE  # noqa: E402

PER_PROMPT = ("examples", "helpfulness_scores")  # kept in the evaluation stage's results, not in report.json
LOSS_STAGES = ("pretrain", "sft", "reward_helpfulness", "reward_safety", "gatt")
PPO_BY_KIND = {"reward_helpfulness_on_helpful_prompts": "helpfulness RM on helpful prompts",
               "reward_safety_on_safety_prompts": "safety RM on safety prompts",
               "oracle_helpfulness_on_helpful_prompts": "oracle helpfulness on helpful prompts",
               "oracle_safety_on_safety_prompts": "oracle safety on safety prompts"}
"""PPO's summary keys (start and end) that the report spells out, and how."""


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (none if the stage wrote no file)."""
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.is_file() else []


def plot_losses(out: Path) -> str | None:
    fig, axes = plt.subplots(1, len(LOSS_STAGES), figsize=(3.2 * len(LOSS_STAGES), 3.2))
    drawn = False
    for ax, stage in zip(axes, LOSS_STAGES, strict=True):
        rows = read_metrics(out / stage / "metrics.jsonl")
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if stage == "gatt" and not rows:
            continue
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), label="train")
            drawn = True
        if val:
            ax.plot(*zip(*val, strict=True), marker="o", label="validation")
        phase = [(r["step"], r["loss"]) for r in read_metrics(out / stage / INSTRUCTION_PHASE / "metrics.jsonl")
                 if "loss" in r]  # SFT's second phase, after the demonstrations' last step
        if phase and train:
            ax.plot([train[-1][0] + step for step, _ in phase], [loss for _, loss in phase], label="instruction phase")
        ax.set(title=stage, xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name if drawn else None


def plot_stage_scores(out: Path, models: dict[str, dict]) -> str:
    names = list(models)
    metrics = ("helpfulness", "violation_rate", "false_refusal_rate")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        ax.bar([n + i * width for n in range(len(names))], [models[m][metric] for m in names], width, label=metric)
    ax.set_xticks([n + width for n in range(len(names))], names)
    ax.set(ylim=(0, 1), title="Each stage's model, judged by the toy world's oracles")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "stage_scores.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


RLHF_SPAN = ("sft", "rlhf")
"""RLHF as a whole (rejection sampling, then PPO) against its SFT start: the paper's Fig. 11 comparison."""


def helpfulness_changes(models: dict[str, dict]) -> list[dict[str, Any]]:
    """Each evaluated model's helpfulness change from the one before it (the model its stage started from),
    then RLHF's as a whole (`RLHF_SPAN`), paired over the same prompts: a stage's effect of a few hundredths
    is only told from noise this way."""
    names = [name for name, m in models.items() if "helpfulness_scores" in m]
    steps = list(pairwise(names))
    if set(RLHF_SPAN) <= set(names) and RLHF_SPAN not in steps:
        steps.append(RLHF_SPAN)
    return [{"from": before, "to": after, **paired_difference(models[before]["helpfulness_scores"],
                                                              models[after]["helpfulness_scores"])}
            for before, after in steps]


def _rises(models: dict[str, dict], changes: list[dict[str, Any]], before: str, after: str) -> tuple[bool, str]:
    """(helpfulness rose by more than two paired standard errors, the numbers); without per-prompt scores (a run
    folder from before they were kept) the means alone decide."""
    b, a = models[before]["helpfulness"], models[after]["helpfulness"]
    change = next((c for c in changes if (c["from"], c["to"]) == (before, after)), None)
    if change is None:
        return a > b, f"{b:.3f} → {a:.3f}"
    d, se = change["difference"], change["standard_error"]
    return d > 2 * se, f"{b:.3f} → {a:.3f} ({d:+.3f} ± {se:.3f} paired over {change['prompts']} prompts)"


GATT_COMPARISON = {"without_gatt": "rlhf", "with_gatt": "gatt"}  # curve label -> the evaluated stage's model


def _adherence(results: dict[str, Any], key: str = "adherence", pools: tuple[str, ...] = ("seen", "held_out")
               ) -> dict[str, dict[str, Any]]:
    """pool -> {"without_gatt": ..., "with_gatt": ...} of the evaluation's `key` (the curve, or `by_kind`)."""
    adherence = results.get("evaluation", {}).get("adherence", {})
    if not all(model in adherence for model in GATT_COMPARISON.values()):
        return {}
    return {pool: {label: adherence[model][pool].get(key, {}) for label, model in GATT_COMPARISON.items()}
            for pool in pools}


def plot_adherence(out: Path, curves: dict[str, dict[str, list]]) -> str | None:
    if not curves:
        return None
    from llama2.evaluation.dialogue import plot_curves

    flat = {f"{label.replace('_', ' ')} ({pool.replace('_', '-')} constraints)": curve
            for pool, pair in curves.items() for label, curve in pair.items()}
    plot_curves(flat, out / "gatt_adherence.png", "GAtt: system instruction kept over 20 turns")
    return "gatt_adherence.png"


RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")


def reward_model_section(results: dict[str, Any]) -> dict[str, Any]:
    """`reward_models.<kind>`: accuracy by rating on the RM's own test set, and the labels' ceiling."""
    out = {}
    for kind in ("helpfulness", "safety"):
        rm_eval = results.get(f"reward_{kind}", {}).get("rm_eval")
        if not rm_eval:
            continue
        own = next(v for k, v in rm_eval["test_sets"].items() if kind in k)
        out[kind] = {"accuracy_by_rating": own["accuracy_by_rating"], "label_ceiling": own.get("label_ceiling"),
                     "oracle_correlation": own.get("oracle_correlation"), "pairs": own["pairs"]}
        if own.get("agreement_with_oracle_by_pair_type"):
            out[kind]["agreement_with_oracle_by_pair_type"] = own["agreement_with_oracle_by_pair_type"]
        if "unsafe_recall" in own:
            out[kind]["unsafe_recall"] = own["unsafe_recall"]["recall"]
            out[kind]["safe_flagged"] = own["unsafe_recall"].get("safe_flagged")
            if "flagged_at_gate" in own:
                out[kind]["at_ppo_gate"] = {k: own["flagged_at_gate"][k] for k in ("recall", "safe_flagged")}
        on_policy = results[f"reward_{kind}"].get("on_policy")
        if on_policy:
            out[kind]["on_policy_samples"] = {"accuracy_by_rating": on_policy["accuracy_by_rating"],
                                              "label_ceiling": on_policy.get("label_ceiling"),
                                              "pairs": on_policy["pairs"]}
    return out


def margin_ablation_section(results: dict[str, Any]) -> dict[str, Any]:
    """`margin_ablation.<mode>`: the helpfulness RM's accuracy by rating on its own test set, per margin mode."""
    runs = results.get("reward_margins", {}).get("rm_eval_by_margin", {})
    return {mode: next(v["accuracy_by_rating"] for k, v in rm_eval["test_sets"].items() if "helpfulness" in k)
            for mode, rm_eval in sorted(runs.items())}


def _rm_checks(rms: dict[str, Any]) -> list[tuple[str, bool, str]]:
    checks = []
    for kind, rm in rms.items():
        acc, ceiling = rm["accuracy_by_rating"]["overall"], rm["label_ceiling"]
        if ceiling:
            checks.append((f"{kind} RM accuracy is at least 90% of what the noisy labels allow", acc >= 0.9 * ceiling,
                           f"accuracy {acc:.3f}, label ceiling {ceiling:.3f}"))
        by = rm["accuracy_by_rating"]
        if by.get("significantly_better") is not None and by.get("negligibly_better") is not None:
            gap = by["significantly_better"] - by["negligibly_better"]
            checks.append((f"{kind} RM: accuracy grows with the rating gap (Table 8)", gap >= 0.15,
                           f"significantly better {by['significantly_better']:.3f}, negligibly better "
                           f"{by['negligibly_better']:.3f}"))
        if "unsafe_recall" in rm:
            # recall counts only if safe responses are not flagged as well (a run folder from before this
            # measure has no `safe_flagged`: recall alone)
            safe_flagged = rm.get("safe_flagged")
            ok = rm["unsafe_recall"] >= 0.9 and (safe_flagged is None or safe_flagged < 0.5)
            numbers = f"recall {rm['unsafe_recall']:.3f}" + (
                f", safe responses flagged {safe_flagged:.3f}" if safe_flagged is not None else "")
            checks.append(("safety RM flags unsafe responses, not safe ones (score below 0.5)", ok, numbers))
    return checks


def _checks(models: dict[str, dict], adherence: dict[str, dict[str, list]], rms: dict[str, Any],
            best_of_n: dict[str, Any], ppo: dict[str, Any], changes: list[dict[str, Any]] = (),
            dialogs: dict[str, list] | None = None) -> list[tuple[str, bool, str]]:
    """(paper claim, reproduced here?, the numbers). A claimed rise in helpfulness counts only when it exceeds
    twice its paired standard error (`changes`). `dialogs` (label -> dialogs evaluated at each turn) puts a
    binomial standard error on GAtt's last-turn share: between two seeds it moved by 0.10 (0.93, 0.83)."""
    checks = _rm_checks(rms)
    if ppo.get("kl_target") is not None and "kl_end" in ppo:
        checks.append(("PPO's KL to the reference stays under the preset's target", ppo["kl_end"] <= ppo["kl_target"],
                       f"last iteration {ppo['kl_end']:.3f}, mean {ppo['mean_kl']:.3f}, target {ppo['kl_target']:g}"))
    oracle = best_of_n.get("oracle_helpfulness_by_n", {})
    if "1" in oracle and "8" in oracle:
        checks.append(("Best-of-N: the oracle helpfulness of the best sample rises with N (Fig. 7)",
                       oracle["8"] > oracle["1"], f"N=1 {oracle['1']:.3f}, N=8 {oracle['8']:.3f}"))
    if "sft" in models and "rejection_sampling" in models:
        checks.append(("Rejection sampling beats its SFT start on oracle helpfulness",
                       *_rises(models, changes, "sft", "rejection_sampling")))
    if "rejection_sampling" in models and "rlhf" in models:
        before, after = models["rejection_sampling"], models["rlhf"]
        checks.append(("PPO raises oracle helpfulness", *_rises(models, changes, "rejection_sampling", "rlhf")))
        if "sft" in models:
            checks.append(("RLHF (rejection sampling, then PPO) makes the model more helpful than SFT (Fig. 11)",
                           *_rises(models, changes, *RLHF_SPAN)))
        checks.append(("PPO does not raise the violation rate", after["violation_rate"] <= before["violation_rate"],
                       f"{before['violation_rate']:.3f} → {after['violation_rate']:.3f}"))
    if "safety" in models and "sft" in models:
        sft_v, safe = models["sft"]["violation_rate"], models["safety"]
        note = "" if sft_v > 0 else " (not testable: the SFT model has no violations to halve)"
        checks.append(("Safety tuning at least halves the SFT model's violation rate",
                       sft_v > 0 and safe["violation_rate"] <= sft_v / 2,
                       f"SFT {sft_v:.3f}, safety-tuned {safe['violation_rate']:.3f}{note}"))
        checks.append(("Safety-tuned model's false refusals on borderline prompts stay at most 0.2",
                       safe["borderline_false_refusal_rate"] <= 0.2, f"{safe['borderline_false_refusal_rate']:.3f}"))
        before = models.get("gatt", models["sft"])
        checks.append(("Safety tuning keeps helpfulness (within 0.05 of the model before it)",
                       safe["helpfulness"] >= before["helpfulness"] - 0.05,
                       f"{before['helpfulness']:.3f} → {safe['helpfulness']:.3f}"))
    if "base" in models and "sft" in models:
        checks.append(("SFT makes the model more helpful than the pretrained one",
                       *_rises(models, changes, "base", "sft")))
    seen = adherence.get("seen")
    if seen:
        reached = [t for t, v in enumerate(seen["with_gatt"]) if v is not None]
        last_without = next((v for v in reversed(seen["without_gatt"]) if v is not None), None)
        if reached and last_without is not None:
            last_with = seen["with_gatt"][reached[-1]]
            first_without = next(v for v in seen["without_gatt"] if v is not None)
            checks.append(("Without GAtt, the system instruction fades over the turns (paper Fig. 9, left)",
                           last_without < first_without, f"turn 1 {first_without:.2f}, last turn {last_without:.2f}"))
            n = dialogs["with_gatt"][reached[-1]] if dialogs else 0
            spread = f" ± {math.sqrt(last_with * (1 - last_with) / n):.2f} ({n} dialogs)" if n else ""
            checks.append(("GAtt keeps the system instruction at the last turn (paper: 100% at turn 20)",
                           last_with >= 0.9, f"without {last_without:.2f}, with {last_with:.2f}{spread}"))
    held = adherence.get("held_out")
    if held:
        mean = {k: sum(v for v in c if v is not None) / max(1, sum(v is not None for v in c)) for k, c in held.items()}
        checks.append(("GAtt generalises to constraints held out of its training",
                       mean["with_gatt"] > mean["without_gatt"],
                       f"mean adherence without {mean['without_gatt']:.2f}, with {mean['with_gatt']:.2f}"))
    return checks


def machines_section(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each machine the stages ran on, with those stages in order (stage folders older than the record have
    none and are left out)."""
    machines: list[dict[str, Any]] = []
    for name, r in results.items():
        if "machine" not in r:
            continue
        entry = next((m for m in machines if m["machine"] == r["machine"]), None)
        if entry is None:
            machines.append(entry := {"machine": r["machine"], "stages": []})
        entry["stages"].append(name)
    return machines


def write_report(out: Path, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    evaluation = results.get("evaluation", {})
    models_full = evaluation.get("models", {})
    models = {name: {k: v for k, v in m.items() if k not in PER_PROMPT} for name, m in models_full.items()}
    changes = helpfulness_changes(models_full)
    adherence = _adherence(results)
    rms = reward_model_section(results)
    best_of_n = results.get("rejection_sampling", {}).get("best_of_n", {})
    report: dict[str, Any] = {
        "models": models,
        "timings": {name: {"seconds": round(r["seconds"], 1)} for name, r in results.items()},
        "machines": machines_section(results),
        "stages": {name: {k: v for k, v in r.items() if k not in ("models", "adherence", "machine")}
                   for name, r in results.items() if name != "evaluation"},
    }
    if changes:
        report["helpfulness_changes"] = changes
    if rms:
        report["reward_models"] = rms
    margins = margin_ablation_section(results)
    if margins:
        report["margin_ablation"] = margins
    ppo_summary = results.get("ppo", {}).get("summary")
    if ppo_summary:
        report["ppo"] = ppo_summary
    distill = results.get("safety", {}).get("distill")
    if distill:
        report["safety_distillation"] = {k: distill[k] for k in ("scorer", "prompts", "kept", "share_kept", "scores")
                                         if k in distill}
    safety_sft = results.get("safety", {}).get("safety_sft")
    if safety_sft:
        report["safety_sft"] = safety_sft
    scaling = results.get("safety_scaling", {})
    if scaling.get("enabled"):
        report["safety_scaling"] = [{k: v for k, v in row.items() if k not in ("model", *PER_PROMPT)}
                                    for row in scaling["rows"]]
    if best_of_n:
        report["rejection_sampling"] = {k: v for k, v in best_of_n.items()
                                        if k.endswith("_by_n") or k == "by_temperature"}
    if adherence:
        report["gatt"] = {"adherence_by_turn": adherence["seen"],
                          "held_out_adherence_by_turn": adherence.get("held_out", {}),
                          "by_kind": _adherence(results, "by_kind", ("seen",))["seen"],
                          "failures_with_gatt": _adherence(results, "failures", ("seen",))["seen"]["with_gatt"],
                          "acceptance_rate": results.get("gatt", {}).get("acceptance_rate"),
                          "turn_acceptance_rate": results.get("gatt", {}).get("turn_acceptance_rate")}
    stage_plots = ["rejection_sampling/best_of_n.png", "ppo/ppo_curves.png", "safety/distill_scores.png",
                   "safety_scaling/scaling_scores.png", "safety_scaling/false_refusal.png",
                   *sorted(str(p.relative_to(out)) for p in out.glob("reward_*/rm_scores_*.png"))]
    plots = [p for p in (plot_losses(out), plot_stage_scores(out, models) if models else None,
                         plot_adherence(out, adherence)) if p]
    plots += [p for p in stage_plots if (out / p).is_file()]
    dialogs = _adherence(results, "dialogs_per_turn", ("seen",)).get("seen")
    checks = _checks(models, adherence, rms, best_of_n, ppo_summary or {}, changes, dialogs)
    report["checks"] = [{"claim": c, "reproduced": ok, "numbers": n} for c, ok, n in checks]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report, models_full, plots))
    report["report_path"] = str(out / "report.md")
    return report


def _decoding_note(model: dict[str, Any]) -> list[str]:
    """How the models' replies were made, under the table (older run folders did not record it)."""
    d, n = model.get("decoding"), model.get("prompts")
    if not d or not n:
        return []
    prompts = f"{n['helpful']} helpful, {n['adversarial']} adversarial and {n['borderline']} borderline prompts"
    if d["temperature"] == 0:
        return ["", f"Greedy replies to {prompts}."]
    return ["", f"{d['samples_per_prompt']} replies a prompt sampled at temperature {d['temperature']:g}, top-p "
            f"{d['top_p']:g}, to {prompts}; a prompt's helpfulness is its replies' mean, the rates are over "
            "every reply."]


def _by_task_lines(models: dict[str, dict]) -> list[str]:
    """Each model's share of right answers per task kind (older run folders did not record it)."""
    named = {name: m["helpful_by_task"] for name, m in models.items() if m.get("helpful_by_task")}
    if not named:
        return []
    kinds = sorted({k for by in named.values() for k in by})
    lines = ["", "Correctness by task kind: the oracle's right-answer part of helpfulness (the name, number or lands "
             "asked for; 0 for a refusal), mean over each kind's prompts. A kind near 0 at every stage is a skill "
             "the model never learnt, and a reward model initialised from it has little to go on there:", "",
             "| task | prompts | " + " | ".join(named) + " |", "|---|---|" + "---|" * len(named)]
    for kind in kinds:
        n = next(by[kind]["prompts"] for by in named.values() if kind in by)
        cells = [f"{by[kind]['correctness']:.2f}" if kind in by else "–" for by in named.values()]
        lines.append(f"| {kind} | {n} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: dict[str, Any], models_full: dict[str, dict], plots: list[str]) -> str:
    lines = ["# llama2 pipeline report", "", "## What each stage did", "",
             "| model | helpfulness ↑ | violation rate ↓ | false refusals (helpful) ↓ "
             "| false refusals (borderline) ↓ |",
             "|---|---|---|---|---|"]
    for name, m in report["models"].items():
        lines.append(f"| {name} | {m['helpfulness']:.3f} | {m['violation_rate']:.3f} | "
                     f"{m['false_refusal_rate']:.3f} | {m['borderline_false_refusal_rate']:.3f} |")
    lines += _decoding_note(next(iter(report["models"].values()), {}))
    if report.get("helpfulness_changes"):
        span = "; sft → rlhf is rejection sampling and PPO together" if any(
            (c["from"], c["to"]) == RLHF_SPAN for c in report["helpfulness_changes"]) else ""
        lines += ["", "Helpfulness change from the model each stage started from, paired over the same prompts (a rise "
                  "counts as reproduced below only when it exceeds twice its standard error; the error is over "
                  "prompts only, and the same stage trained with another seed can land further away"
                  f"{span}):", "",
                  "| stage | change | standard error | prompts | prompts scored differently |", "|---|---|---|---|---|"]
        lines += [f"| {c['from']} → {c['to']} | {c['difference']:+.3f} | {c['standard_error']:.3f} | {c['prompts']} | "
                  f"{c['changed']} |" for c in report["helpfulness_changes"]]
    lines += _by_task_lines(report["models"])
    lines += ["", "## Paper results, checked on the toy world", "", "| claim | reproduced | numbers |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {'yes' if c['reproduced'] else '**no**'} | {c['numbers']} |" for c in report["checks"]]
    if "reward_models" in report:
        lines += ["", "## Reward models: accuracy by rating level (Table 8 layout)", "",
                  "| RM | " + " | ".join(r.replace("_", " ") for r in RATINGS) + " | overall | label ceiling |",
                  "|---|" + "---|" * (len(RATINGS) + 2)]
        for kind, rm in report["reward_models"].items():
            by = rm["accuracy_by_rating"]
            cells = ["–" if by.get(r) is None else f"{by[r]:.3f}" for r in (*RATINGS, "overall")]
            ceiling = "–" if rm["label_ceiling"] is None else f"{rm['label_ceiling']:.3f}"
            lines.append(f"| {kind} | " + " | ".join(cells) + f" | {ceiling} |")
        for kind, rm in report["reward_models"].items():
            by_type = rm.get("agreement_with_oracle_by_pair_type")
            if by_type:
                lines += ["", f"The {kind} RM orders a test pair as the oracle does (not as its noisy label says), by "
                              f"what separates the two responses (pairs): {_shares(by_type)}."]
                tasks = by_type.get("correctness", {}).get("by_task")
                if tasks:
                    lines[-1] += (" Where one answer is right and the other is not, by the question's kind: "
                                  f"{_shares(tasks)}.")
            if "on_policy_samples" in rm:
                p = rm["on_policy_samples"]
                lines += ["", f"The {kind} RM on {p['pairs']} pairs of the SFT model's own samples (held-out prompts, "
                              "temperatures 0.7 and 1.2, ranked by the oracle annotator; the pairs best-of-N, "
                              f"rejection sampling and PPO ask it to rank): accuracy "
                              f"{p['accuracy_by_rating']['overall']:.3f}, label ceiling {p['label_ceiling']:.3f}."]
    if "margin_ablation" in report:
        lines += ["", "## Helpfulness RM by margin (Table 28 analogue)", "",
                  "| margin | " + " | ".join(r.replace("_", " ") for r in RATINGS) + " | overall |",
                  "|---|" + "---|" * (len(RATINGS) + 1)]
        for mode, by in report["margin_ablation"].items():
            cells = ["–" if by.get(r) is None else f"{by[r]:.3f}" for r in (*RATINGS, "overall")]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if "rejection_sampling" in report:
        rs = report["rejection_sampling"]
        ns = list(rs.get("reward_by_n", {}))
        lines += ["", "## Rejection sampling: best of N (Fig. 7 analogue)", "",
                  "| | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
        for key in ("reward_by_n", "oracle_helpfulness_by_n", "oracle_safety_by_n"):
            if key in rs:
                lines.append(f"| {key.replace('_by_n', '').replace('_', ' ')} | "
                             + " | ".join(f"{rs[key][n]:.3f}" for n in ns) + " |")
    if "ppo" in report:
        p = report["ppo"]
        nan = float("nan")
        lines += ["", "## PPO", "", f"Reward (R_c, sigmoid scale) {p['reward_start']:.3f} → {p['reward_end']:.3f}; "
                  f"mean KL to the reference {p['mean_kl']:.4f} ({p.get('kl_estimator', '?')} estimator, "
                  f"β = {p.get('beta', '?')}); oracle helpfulness {p.get('oracle_helpfulness_start', nan):.3f} "
                  f"→ {p.get('oracle_helpfulness_end', nan):.3f}."]
        by_kind = [f"{label} {p[key + '_start']:.3f} → {p[key + '_end']:.3f}" for key, label in PPO_BY_KIND.items()
                   if p.get(key + "_start") is not None and p.get(key + "_end") is not None]
        if by_kind:
            lines.append("By the score each kind of prompt is rewarded with: " + "; ".join(by_kind) + ".")
        if "early_stopping" in p:
            e = p["early_stopping"]
            lines.append(f"Early stopping on held-out prompts: {e['evaluations']} evaluations"
                         f"{', stopped early' if e['stopped_early'] else ''}; the stage's model is the policy after "
                         f"iteration {e['best_iteration']} (held-out reward {e['best_reward']:.3f}).")
    if "safety_distillation" in report:
        d = report["safety_distillation"]
        medians = ", ".join(f"{k} {v['median']:.3f}" for k, v in d.get("scores", {}).items())
        lines += ["", "## Safety context distillation", "",
                  f"Kept {d['kept']} of {d['prompts']} distilled answers ({d['share_kept']:.0%}), scored by "
                  f"{d['scorer']}; median safety score by preprompt: {medians} (Fig. 16a analogue)."]
    if "safety_sft" in report:
        m = report["safety_sft"]
        lines.append(f"\nThe same fine-tune mixed in {m['demonstrations']} safety demonstrations, "
                     f"{m.get('borderline', 0)} borderline answers and {m['helpful_replay']} helpful dialogs "
                     "(safety SFT beside the distilled answers).")
    if "safety_scaling" in report:
        from llama2.stages.safety_scaling import table_lines

        lines += ["", "## Safety-data scaling (Fig. 15 and Fig. 33 analogues)", "",
                  "Safety SFT from the pretrained model with the helpfulness data fixed and a growing share of "
                  "safety demonstrations (`safety_scaling/scaling.md`):", "", *table_lines(report["safety_scaling"])]
    if "gatt" in report:
        seen = report["gatt"]["adherence_by_turn"]
        lines += ["", "## Ghost Attention: adherence by turn (seen constraints)", "",
                  "| turn | " + " | ".join(str(t + 1) for t in range(len(seen["with_gatt"]))) + " |",
                  "|---|" + "---|" * len(seen["with_gatt"])]
        for label, curve in seen.items():
            lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in curve) + " |")
        kinds = sorted({k for by in report["gatt"]["by_kind"].values() for k in by})
        if kinds:
            lines += ["", "Each constraint checked alone (seen constraints), share obeyed at turn 1 / over all turns:",
                      "", "| model | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
            for label, by in report["gatt"]["by_kind"].items():
                cells = [f"{by[k]['turn_1']:.2f} / {by[k]['all_turns']:.2f}" if k in by and by[k]["turn_1"] is not None
                         else "–" for k in kinds]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        failures = report["gatt"].get("failures_with_gatt")
        if failures:
            lines += ["", "Dialogs in which the GAtt model broke its instruction (seen constraints): the first reply "
                      "that did.", "", "| instruction | first turn | turns broken | broke | reply |",
                      "|---|---|---|---|---|"]
            lines += [f"| {f['instruction']} | {f['first_turn']} | {f['turns_failed']} | {'; '.join(f['broken'])} | "
                      f"{f['reply'].strip()!r} |" for f in failures]
        rate, turns = report["gatt"].get("acceptance_rate"), report["gatt"].get("turn_acceptance_rate")
        if rate is not None and turns is not None:
            lines.append(f"\nGAtt training data: the checker accepted {rate:.0%} of the sampled replies, and "
                         f"{turns:.0%} of the sampled turns had an accepted one (the first is trained on).")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Sample replies", ""]
    for name, m in models_full.items():
        for kind, examples in m.get("examples", {}).items():
            for ex in examples[:1]:
                lines.append(f"- **{name}**, {kind}: *{ex['prompt']}* → {ex['reply']!r}")
    lines += ["", "## Timings", ""]
    machines = report.get("machines", [])
    if len(machines) == 1:
        lines += [f"On {machine_line(machines[0]['machine'])}.", ""]
    elif machines:  # a resumed run that moved: its timings add up different machines' seconds
        lines += [f"- {', '.join(m['stages'])}: {machine_line(m['machine'])}" for m in machines] + [""]
    lines += ["| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {t['seconds']:.0f} |" for name, t in report["timings"].items()]
    return "\n".join(lines) + "\n"


def _shares(groups: dict[str, dict]) -> str:
    """Agreement shares keyed by group, written as "correctness 0.624 (335), form 0.893 (234)"."""
    return ", ".join(f"{name} {v['accuracy']:.3f} ({v['pairs']})" for name, v in groups.items())
