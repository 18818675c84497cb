"""The pipeline's report: `report.json` (DESIGN §4 keys), `report.md` with tables, and PNG plots.

Where the toy world does not reproduce a paper result, the report says so next to the number (the
`checks` list compares each measured effect with what the paper reports).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen first)

LOSS_STAGES = ("pretrain", "sft", "gatt")


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.is_file() else []


def plot_losses(out: Path) -> str | None:
    fig, axes = plt.subplots(1, len(LOSS_STAGES), figsize=(12, 3.2))
    drawn = False
    for ax, stage in zip(axes, LOSS_STAGES, strict=True):
        rows = _metrics(out / stage / "metrics.jsonl")
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), label="train")
            drawn = True
        if val:
            ax.plot(*zip(*val, strict=True), marker="o", label="validation")
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


def _adherence(results: dict[str, Any]) -> dict[str, dict[str, list]]:
    adherence = results.get("evaluation", {}).get("adherence", {})
    out: dict[str, dict[str, list]] = {}
    for pool in ("seen", "held_out"):
        if "sft" in adherence and "gatt" in adherence:
            out[pool] = {"without_gatt": adherence["sft"][pool]["adherence"],
                         "with_gatt": adherence["gatt"][pool]["adherence"]}
    return out


def plot_adherence(out: Path, curves: dict[str, dict[str, list]]) -> str | None:
    if not curves:
        return None
    from llama2.evaluation.dialogue import plot_curves

    flat = {f"{label.replace('_', ' ')} ({pool.replace('_', '-')} constraints)": curve
            for pool, pair in curves.items() for label, curve in pair.items()}
    plot_curves(flat, out / "gatt_adherence.png", "GAtt: system instruction kept over 20 turns")
    return "gatt_adherence.png"


def _checks(models: dict[str, dict], adherence: dict[str, dict[str, list]]) -> list[tuple[str, bool, str]]:
    """(paper claim, reproduced here?, the numbers)."""
    checks = []
    if "base" in models and "sft" in models:
        b, s = models["base"]["helpfulness"], models["sft"]["helpfulness"]
        checks.append(("SFT makes the model more helpful than the pretrained one", s > b, f"{b:.3f} → {s:.3f}"))
    seen = adherence.get("seen")
    if seen:
        last_with = next((v for v in reversed(seen["with_gatt"]) if v is not None), None)
        last_without = next((v for v in reversed(seen["without_gatt"]) if v is not None), None)
        if last_with is not None and last_without is not None:
            checks.append(("GAtt keeps the system instruction at the last turn (paper: 100% at turn 20)",
                           last_with >= 0.9, f"without {last_without:.2f}, with {last_with:.2f}"))
    held = adherence.get("held_out")
    if held:
        mean = {k: sum(v for v in c if v is not None) / max(1, sum(v is not None for v in c)) for k, c in held.items()}
        checks.append(("GAtt generalises to constraints held out of its training",
                       mean["with_gatt"] > mean["without_gatt"],
                       f"mean adherence without {mean['without_gatt']:.2f}, with {mean['with_gatt']:.2f}"))
    return checks


def write_report(out: Path, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    evaluation = results.get("evaluation", {})
    models = {name: {k: v for k, v in m.items() if k != "examples"} for name, m in evaluation.get("models", {}).items()}
    adherence = _adherence(results)
    report: dict[str, Any] = {
        "models": models,
        "timings": {name: {"seconds": round(r["seconds"], 1)} for name, r in results.items()},
        "stages": {name: {k: v for k, v in r.items() if k not in ("models", "adherence")}
                   for name, r in results.items() if name != "evaluation"},
    }
    if adherence:
        report["gatt"] = {"adherence_by_turn": adherence["seen"],
                          "held_out_adherence_by_turn": adherence.get("held_out", {}),
                          "acceptance_rate": results.get("gatt", {}).get("acceptance_rate")}
    plots = [p for p in (plot_losses(out), plot_stage_scores(out, models) if models else None,
                         plot_adherence(out, adherence)) if p]
    checks = _checks(models, adherence)
    report["checks"] = [{"claim": c, "reproduced": ok, "numbers": n} for c, ok, n in checks]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report, evaluation.get("models", {}), plots))
    report["report_path"] = str(out / "report.md")
    return report


def render_markdown(report: dict[str, Any], models_full: dict[str, dict], plots: list[str]) -> str:
    lines = ["# llama2 pipeline report", "", "## What each stage did", "",
             "| model | helpfulness ↑ | violation rate ↓ | false refusals (helpful) ↓ "
             "| false refusals (borderline) ↓ |",
             "|---|---|---|---|---|"]
    for name, m in report["models"].items():
        lines.append(f"| {name} | {m['helpfulness']:.3f} | {m['violation_rate']:.3f} | "
                     f"{m['false_refusal_rate']:.3f} | {m['borderline_false_refusal_rate']:.3f} |")
    lines += ["", "## Paper results, checked on the toy world", "", "| claim | reproduced | numbers |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {'yes' if c['reproduced'] else '**no**'} | {c['numbers']} |" for c in report["checks"]]
    if "gatt" in report:
        seen = report["gatt"]["adherence_by_turn"]
        lines += ["", "## Ghost Attention: adherence by turn (seen constraints)", "",
                  "| turn | " + " | ".join(str(t + 1) for t in range(len(seen["with_gatt"]))) + " |",
                  "|---|" + "---|" * len(seen["with_gatt"])]
        for label, curve in seen.items():
            lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in curve) + " |")
        rate = report["gatt"].get("acceptance_rate")
        if rate is not None:
            lines.append(f"\nGAtt training data: the checker accepted {rate:.0%} of the sampled replies.")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Sample replies", ""]
    for name, m in models_full.items():
        for kind, examples in m.get("examples", {}).items():
            for ex in examples[:1]:
                lines.append(f"- **{name}**, {kind}: *{ex['prompt']}* → {ex['reply']!r}")
    lines += ["", "## Timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {t['seconds']:.0f} |" for name, t in report["timings"].items()]
    return "\n".join(lines) + "\n"
