"""Ghost Attention adherence: does a system instruction still hold at turn 20? (SPEC §9, Table 30)

Held-out dialogs open with a system message of 1–3 constraints (hobby, language, public figure, format;
terse or verbose), then toy-world user messages continue the conversation for `turns` turns. The model's
own replies stay in the history; each reply is checked against every constraint by the toy world's rule
checker. Adherence at turn t is the share of dialogs whose reply at turn t obeys all constraints, among the
dialogs that still fit the model's context at that turn. `by_kind` also checks each constraint alone, at turn 1
and over all turns: a model that cannot copy a hobby from its instruction fails every set holding one, and the
curve alone would not say so. The same is measured on constraints held out of
GAtt training (the paper's zero-shot "Always answer with Haiku" test). `failures` lists each dialog that broke
its instruction: the first reply that did, which constraints it broke, and in how many turns.

`llama2 eval --task gatt_adherence --model DIR [--option baseline=DIR] [--option turns=20]`
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llama2.data.toyworld import ToyWorld
from llama2.data.toyworld.constraints import Constraint, wording
from llama2.evaluation.registry import EvalContext, task
from llama2.generation.llama import Llama
from llama2.generation.prefix_cache import PrefixCache
from llama2.tokenizer.chat_format import encode_dialog


@dataclass
class AdherenceSettings:
    dialogs: int = 24
    """Held-out dialogs per constraint pool."""
    turns: int = 20
    """Turns per dialog (the paper reports up to 20)."""
    max_gen_len: int = 48
    """Longest reply; toy-world answers are a sentence or two."""
    temperature: float = 0.0
    """Greedy by default, so the curve is a property of the model, not of sampling noise."""
    seed: int = 0


def opening_dialogs(world: ToyWorld, n: int, turns: int, held_out: bool, seed: int
                    ) -> list[tuple[list[Constraint], str, list[str]]]:
    """(constraints, system message, user turns) for `n` dialogs; terse wording half the time."""
    rng = random.Random(f"gatt-eval-{seed}-{held_out}")
    followups = world.user_followups(n * turns, seed=10_000 + seed + held_out)
    out = []
    for i in range(n):
        cs = world.sample_constraints(rng, held_out=held_out)
        out.append((cs, wording(cs, terse=rng.random() < 0.5), followups[i * turns : (i + 1) * turns]))
    return out


def adherence_by_turn(llm: Llama, world: ToyWorld, settings: AdherenceSettings, held_out: bool,
                      progress: bool = True) -> dict:
    """One pool's curve (seen or held-out constraints); see `adherence_of_pools`."""
    pool = "held_out" if held_out else "seen"
    return adherence_of_pools(llm, world, settings, (pool,), progress)[pool]


def adherence_of_pools(llm: Llama, world: ToyWorld, settings: AdherenceSettings, pools: tuple[str, ...],
                       progress: bool = True) -> dict[str, dict]:
    """Run every pool's dialogs turn by turn, all of them in one batch at each turn (decoding is greedy, so a
    reply does not depend on its batch; 128 rows a step instead of 64 twice), and check every reply; one
    result per pool ("seen", "held_out")."""
    openings = {pool: opening_dialogs(world, settings.dialogs, settings.turns, pool == "held_out", settings.seed)
                for pool in pools}
    rows = [(pool, j) for pool in pools for j in range(len(openings[pool]))]  # one per dialog, every pool
    dialogs = [[{"role": "system", "content": openings[pool][j][1]}] for pool, j in rows]
    verdicts: list[list[dict]] = [[] for _ in rows]  # per dialog: each turn's verdict on every constraint
    texts: list[list[str]] = [[] for _ in rows]
    alive = list(range(len(rows)))
    limit = llm.args.max_seq_len
    cache = PrefixCache()  # each turn prefills its new messages only, not the dialog's whole history
    for turn in tqdm(range(settings.turns), desc=f"gatt adherence ({', '.join(pools)})", disable=not progress):
        for i in alive:
            pool, j = rows[i]
            dialogs[i].append({"role": "user", "content": openings[pool][j][2][turn]})
        # A dialog whose prompt plus a full reply would not fit the context stops here.
        alive = [i for i in alive if len(encode_dialog(llm.tokenizer, dialogs[i])) + settings.max_gen_len <= limit]
        if not alive:
            break
        replies = llm.chat_completion([dialogs[i] for i in alive], temperature=settings.temperature,
                                      max_gen_len=settings.max_gen_len, seed=settings.seed + turn,
                                      prefix_cache=cache, cache_keys=alive)
        for i, reply in zip(alive, replies, strict=True):
            pool, j = rows[i]
            text = reply["generation"]["content"]
            verdicts[i].append(world.constraints.check(openings[pool][j][0], text))
            texts[i].append(text)
            dialogs[i].append({"role": "assistant", "content": text})
    return {pool: _summary([(openings[pool][j][1], verdicts[i], texts[i]) for i, (p, j) in enumerate(rows)
                            if p == pool], dialogs[rows.index((pool, 0))], settings.turns) for pool in pools}


def _summary(runs: list[tuple[str, list[dict], list[str]]], example: list[dict], turns: int) -> dict:
    """A pool's curve, per-constraint shares and failures from each dialog's (instruction, verdicts by turn,
    replies)."""
    obeyed = [[] for _ in range(turns)]  # per turn: one bool per dialog that reached it
    by_kind: dict[str, list[list[bool]]] = {}  # kind -> [turn-1 verdicts, all verdicts], each constraint alone
    failures = []  # per dialog that broke its instruction: its first reply that did, and how often it did
    for instruction, by_turn, replies in runs:
        failure = None
        for turn, (checked, text) in enumerate(zip(by_turn, replies, strict=True)):
            obeyed[turn].append(all(checked.values()))
            if not all(checked.values()):
                if failure is None:
                    failure = {"instruction": instruction, "first_turn": turn + 1, "reply": text,
                               "broken": [f"{c.kind}: {c.value}" for c, ok in checked.items() if not ok],
                               "turns_failed": 0}
                failure["turns_failed"] += 1
            for c, ok in checked.items():
                first, every = by_kind.setdefault(c.category, [[], []])
                every.append(ok)
                if turn == 0:
                    first.append(ok)
        if failure is not None:
            failures.append(failure)
    curve = [sum(x) / len(x) if x else None for x in obeyed]
    kinds = {kind: {"turn_1": _share(first), "all_turns": _share(every), "constraints": len(first)}
             for kind, (first, every) in sorted(by_kind.items())}
    return {"adherence": curve, "dialogs_per_turn": [len(x) for x in obeyed], "by_kind": kinds,
            "failures": failures, "example": example}


def _share(verdicts: list[bool]) -> float | None:
    return sum(verdicts) / len(verdicts) if verdicts else None


def plot_curves(curves: dict[str, list[float | None]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, curve in curves.items():
        turns = [t + 1 for t, v in enumerate(curve) if v is not None]
        ax.plot(turns, [v for v in curve if v is not None], marker="o", markersize=3, label=label)
    ax.set(xlabel="turn", ylabel="share obeying the instruction", ylim=(-0.02, 1.02),
           title=title)
    ax.grid(alpha=0.3)
    # below the axes: inside, it covered the GAtt curve, which runs along the top
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_adherence(llm: Llama, settings: AdherenceSettings, world_seed: int = 0) -> dict:
    return adherence_of_pools(llm, ToyWorld(world_seed), settings, ("seen", "held_out"))


@task("gatt_adherence")
def gatt_adherence_task(ctx: EvalContext) -> dict:
    """Share of replies obeying a system instruction at each of 20 turns (seen and held-out constraints)."""
    settings = AdherenceSettings(dialogs=ctx.limit or AdherenceSettings.dialogs, seed=ctx.seed,
                                 turns=int(ctx.options.get("turns", AdherenceSettings.turns)))
    world_seed = int(ctx.options.get("world_seed", 0))
    result = {"model": evaluate_adherence(ctx.llm, settings, world_seed)}
    if "baseline" in ctx.options:
        baseline = Llama.load(ctx.options["baseline"], device=ctx.llm.device)
        result["baseline"] = evaluate_adherence(baseline, settings, world_seed)
    if ctx.out_dir is not None:
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        curves = {f"{name}, {pool}": r[pool]["adherence"] for name, r in result.items() for pool in r}
        plot_curves(curves, ctx.out_dir / "gatt_adherence.png", "GAtt: instruction kept over turns")
        (ctx.out_dir / "gatt_dialog_example.json").write_text(
            json.dumps(result["model"]["seen"]["example"], indent=2, ensure_ascii=False))
    for r in result.values():
        for pool in r.values():
            pool.pop("example")
    return result
