"""Ghost Attention (SPEC §9): teach the chat model to keep a system instruction for many turns.

Step by step, as the paper describes it:
 1. take multi-turn dialogs (toy-world user messages, or the user turns of a chat jsonl file);
 2. sample a synthetic instruction by combining constraints (hobby, language, public figure, format),
    in terse wording half the time;
 3. append the instruction to every user message and sample the replies with the current chat model,
    turn by turn; a reply is kept only if the constraint checker accepts it (`samples_per_turn` tries, the
    first accepted one wins); a turn with no accepted reply keeps its first sample as context only, and the
    dialog goes on, so that late turns are sampled too (ending the dialog there left few examples past
    turn 12, and adherence fell after the last turn trained on). Once a long dialog with the instruction
    on every user message no longer fits the context, it is appended to the latest user messages that fit
    (and is in the system message throughout): the paper's form would stop the dialog near turn 15 of 20;
 4. build training dialogs with the instruction only in the system message;
 5. zero the loss on every earlier turn, assistant replies included, and on rejected replies. The paper
    trains one example per turn with the loss on its last reply only. Attention is causal, so the loss of
    turn t's reply within the whole dialog is exactly that example's loss (later turns are invisible to
    it); one dialog with every accepted reply trained (`"weight": 0` on the rejected ones) therefore holds
    all of the dialog's examples and computes their shared context once, not once per turn;
 6. fine-tune through the SFT path (with any `mix_files` beside the GAtt dialogs).
`report.json` in the run folder records how many replies were sampled and accepted.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from llama2.data.formats import Message, read_chat, write_chat
from llama2.data.toyworld import ToyWorld
from llama2.data.toyworld.constraints import Constraint, wording
from llama2.generation.llama import Llama
from llama2.generation.prefix_cache import PrefixCache
from llama2.stages import sft
from llama2.stages.artifacts import model_dir
from llama2.tokenizer.chat_format import encode_dialog
from llama2.training.loop import TrainConfig, TrainResult


@dataclass
class GAttData:
    """How the synthetic Ghost Attention dialogs are made."""

    dialogs: int = 64
    """Dialogs to synthesise (each one with an accepted reply is a training dialog)."""
    min_turns: int = 2
    """Fewest user turns in a dialog."""
    max_turns: int = 8
    """Most user turns in a dialog (also bounded by the model's context)."""
    user_turns_file: str | None = None
    """A chat jsonl whose user messages are used as the dialogs' turns (None: toy-world user messages)."""
    world_seed: int = 0
    """The toy world supplying constraints (and user messages when no file is given)."""
    terse_rate: float = 0.5
    """Share of instructions in their terse wording ("Figure: Queen Mira")."""
    balanced: bool = True
    """Deal each kind's constraint values from a shuffled deck (a new one when it runs out), so that every
    hobby, figure and format is in about as many dialogs as the others; the combinations stay random. False
    draws each value independently: then the demo's 88 dialogs held fishing twice and knitting once, and its
    GAtt model lost fishing (writing sailing from turn 2 or 3 on in 6 of 48 evaluation dialogs)."""
    samples_per_turn: int = 4
    """Replies sampled per turn; the first one the checker accepts is kept."""
    temperature: float = 0.7
    """Sampling temperature of the replies."""
    top_p: float = 0.9
    max_gen_len: int = 48
    """Longest sampled reply, in tokens."""
    system_while_sampling: bool = True
    """Also give the instruction as a system message while sampling (besides appending it to every user
    message, as the paper does): a small SFT model follows it best when it is in both places it was trained
    on, and more accepted replies mean longer GAtt dialogs."""
    finished_only: bool = True
    """Keep a reply only if it ends a sentence (its last character neither a letter nor a digit). The checker
    passes a reply cut off before a number or a name ("ehT rewsna si") when every constraint it holds survives
    the cut (Backspeak, capitals, a word limit): runs/demo27 trained on 38 such replies of 1369, and its GAtt
    model cut its own replies off that way late in dialogs. An unfinished reply is context only, like a rejected
    one, and the first finished sample is preferred as context."""
    hobbies_in_language: int = 0
    """Dialogs per seen hobby and seen language whose instruction asks for that hobby in that language (a third
    constraint half the time), on top of the `dialogs` random ones. Drawn at random, the demo's 88 dialogs never
    paired singing (seed 0) or dancing (seed 1) with Backspeak, and the GAtt model then wrote another hobby
    reversed from turn 2 in those evaluation dialogs. The demo preset adds 3 each (27 more dialogs) and samples
    3 replies a turn instead of 4 (`samples_per_turn`), which pays for most of them: from runs/demo36's PPO
    models turn 20 0.87 -> 0.90 (56 of 62) and 0.81 -> 0.85 (51 of 60), mean over 20 turns 0.915 -> 0.954 and
    0.877 -> 0.900, held-out 0.44 -> 0.43 and 0.30 -> 0.23, GAtt's helpfulness 0.617 -> 0.624 and 0.655 -> 0.650
    (runs/demo40 and runs/demo39_seed1). With 4 samples a turn: 0.89 and 0.83 for ~55 s more. What breaks
    then is turns 17-20 (repetition loops, another figure's name).
    In place of 27 random dialogs instead (runs/demo37): turn 20 0.82."""
    oracle_fallback: bool = False
    """When no sampled reply passes the checker, use the toy world's rewrite of the first sample that obeys
    the instruction (a plumbing aid for tiny smoke runs, not the paper's method; counted in the report)."""
    seed: int = 0


@dataclass
class Config:
    """`llama2 gatt`: a chat model, how to synthesise GAtt data, and the fine-tuning settings."""

    out_dir: str = "runs/gatt"
    """Run folder: `gatt_train.jsonl`, `report.json`, and the fine-tuning run's checkpoints and metrics."""
    init_from: str = ""
    """The chat model that samples the replies and is fine-tuned (model or run directory)."""
    data: GAttData = field(default_factory=GAttData)
    """The synthetic dialogs."""
    epochs: float = 2.0
    """Passes over the training dialogs (the GAtt dialogs and any `mix_files`)."""
    block_diagonal: bool = True
    """Attention only within each packed dialog during fine-tuning."""
    mix_files: list[str] = field(default_factory=list)
    """Chat jsonl mixed into the fine-tune beside the GAtt dialogs (e.g. one-turn dialogs that obey a system
    instruction), so that a few dozen synthetic dialogs do not wear down what the model did at turn 1."""
    train: TrainConfig = field(default_factory=sft.finetune_train)
    """The fine-tuning engine settings (`steps` is set from `epochs`)."""


@dataclass
class Conversation:
    constraints: list[Constraint]
    instruction: str
    users: list[str]
    replies: list[str] = field(default_factory=list)
    accepted: list[bool] = field(default_factory=list)
    """Per reply: did the checker accept it (trained on), or is it the context of later turns only."""

    def sampling_dialog(self, turn: int, system: bool = False, appended_from: int = 0) -> list[Message]:
        """Step 3's context for `turn`: the instruction appended to every user message from `appended_from`
        on (0: all of them), the earlier replies kept."""
        out: list[Message] = [{"role": "system", "content": self.instruction}] if system else []
        for t in range(turn + 1):
            user = f"{self.users[t]} {self.instruction}" if t >= appended_from else self.users[t]
            out.append({"role": "user", "content": user})
            if t < turn:
                out.append({"role": "assistant", "content": self.replies[t]})
        return out

    def training_dialog(self) -> list[Message]:
        """Steps 4-5: the instruction only in the system message; the turns up to the last accepted one, each
        accepted reply trained and every other one context only (weight 0)."""
        last = max(t for t, ok in enumerate(self.accepted) if ok)
        out: list[Message] = [{"role": "system", "content": self.instruction}]
        for t in range(last + 1):
            out.append({"role": "user", "content": self.users[t]})
            out.append({"role": "assistant", "content": self.replies[t], **({} if self.accepted[t] else {"weight": 0})})
        return out


def user_turns(cfg: GAttData, world: ToyWorld, n: int | None = None) -> list[list[str]]:
    """Step 1: the user side of `n` multi-turn dialogs (`cfg.dialogs` by default); the first ones are the same
    whatever `n` is."""
    rng = random.Random(f"gatt-turns-{cfg.seed}")
    lengths = [rng.randint(cfg.min_turns, cfg.max_turns) for _ in range(cfg.dialogs if n is None else n)]
    if cfg.user_turns_file is None:
        pool = world.user_followups(sum(lengths), seed=cfg.seed)
    else:
        pool = [m["content"] for r in read_chat(cfg.user_turns_file) for m in r.messages if m["role"] == "user"]
        if not pool:
            raise ValueError(f"{cfg.user_turns_file}: holds no user messages")
        pool = [rng.choice(pool) for _ in range(sum(lengths))]
    out, start = [], 0
    for n in lengths:
        out.append(pool[start : start + n])
        start += n
    return out


class Decks:
    """Deals constraints of each kind from a shuffled deck of that kind's options, a new deck when it runs out."""

    def __init__(self, rng: random.Random):
        self.rng, self.decks = rng, {}

    def __call__(self, options: list[Constraint]) -> Constraint:
        key = tuple(options)
        if not self.decks.get(key):
            self.decks[key] = self.rng.sample(options, len(options))
        return self.decks[key].pop()


def sample_instructions(cfg: GAttData, world: ToyWorld, n: int) -> list[tuple[list[Constraint], str]]:
    """Step 2: random combinations of constraints from the training pool, terse half the time (each kind's
    values dealt evenly when `cfg.balanced`), followed by `cfg.hobbies_in_language` dialogs per seen hobby and
    language."""
    rng = random.Random(f"gatt-instructions-{cfg.seed}")
    pick = Decks(random.Random(f"gatt-decks-{cfg.seed}")) if cfg.balanced else None
    out = []
    for _ in range(n):
        cs = world.sample_constraints(rng, held_out=False, pick=pick)
        out.append((cs, wording(cs, terse=rng.random() < cfg.terse_rate)))
    return out + _hobbies_in_language(cfg, world)


def _hobbies_in_language(cfg: GAttData, world: ToyWorld) -> list[tuple[list[Constraint], str]]:
    rng = random.Random(f"gatt-cover-{cfg.seed}")
    seen = world.constraints.pool(False)
    out = []
    for hobby in (c for c in seen if c.kind == "hobby"):
        for language in (c for c in seen if c.kind == "language"):
            for _ in range(cfg.hobbies_in_language):
                cs = world.constraints.third_half_the_time(rng, [hobby, language])
                out.append((cs, wording(cs, terse=rng.random() < cfg.terse_rate)))
    rng.shuffle(out)
    return out


def sample_replies(llm: Llama, world: ToyWorld, conversations: list[Conversation], cfg: GAttData) -> dict:
    """Step 3, batched over dialogs: sample `samples_per_turn` replies per turn (each dialog prefilled once for
    all of them, and only its new messages since the last turn: a prefix cache), keep the first accepted, else
    the first non-empty sample as context (all empty: the dialog ends)."""
    sampled = passed = fallbacks = shortened = 0
    cache = PrefixCache()  # each dialog's history is prefilled once, not again at every turn
    alive = list(range(len(conversations)))
    max_turns = max(len(c.users) for c in conversations)
    for turn in tqdm(range(max_turns), desc="gatt: sampling replies", file=sys.stderr):
        alive = [i for i in alive if turn < len(conversations[i].users)]
        fitted = {i: _fitting_context(llm, conversations[i], turn, cfg) for i in alive}
        alive = [i for i in alive if fitted[i] is not None]
        contexts = {i: fitted[i][0] for i in alive}
        shortened += sum(fitted[i][1] > 0 for i in alive)
        if not alive:
            break
        replies = llm.chat_completion([contexts[i] for i in alive], temperature=cfg.temperature, top_p=cfg.top_p,
                                      max_gen_len=cfg.max_gen_len, seed=cfg.seed * 1000 + turn,
                                      samples_per_prompt=cfg.samples_per_turn, prefix_cache=cache, cache_keys=alive)
        sampled += len(replies)
        survivors = []
        for k, i in enumerate(alive):
            candidates = replies[k * cfg.samples_per_turn : (k + 1) * cfg.samples_per_turn]
            texts = [t for t in (c["generation"]["content"].strip() for c in candidates) if t]
            reply, accepted, rewritten, passing = _choose_reply(world, conversations[i].constraints, texts, cfg)
            passed += passing
            if reply is None:
                continue  # nothing to continue from: the dialog ends here
            conversations[i].replies.append(reply)
            conversations[i].accepted.append(accepted)
            fallbacks += rewritten
            survivors.append(i)
        alive = survivors
    return {"replies_sampled": sampled, "replies_passing": passed,
            "turns_accepted": sum(sum(c.accepted) for c in conversations), "oracle_fallbacks": fallbacks,
            "turns_sampled": sum(len(c.replies) for c in conversations),
            "turns_with_instruction_on_latest_users_only": shortened}


def _fitting_context(llm: Llama, conversation: Conversation, turn: int, cfg: GAttData
                     ) -> tuple[list[Message], int] | None:
    """(context, appended_from): the sampling context of `turn` with the instruction appended to as many of the
    latest user messages as fit the model's context with a whole reply (None: not even the last one fits, so
    the dialog ends)."""
    for appended_from in range(turn + 1):
        context = conversation.sampling_dialog(turn, cfg.system_while_sampling, appended_from)
        if len(encode_dialog(llm.tokenizer, context)) + cfg.max_gen_len < llm.args.max_seq_len:
            return context, appended_from
    return None


def _choose_reply(world: ToyWorld, constraints: list[Constraint], texts: list[str], cfg: GAttData
                  ) -> tuple[str | None, bool, bool, int]:
    """(reply, accepted, rewritten, passing) for one turn's non-empty samples: the first the checker accepts
    (and, with `finished_only`, that ends a sentence); else, with `oracle_fallback`, the toy world's rewrite of
    the first; else the first (finished one, if any) as context only (None: no sample). `passing` counts the
    samples the checker accepts, for the report's acceptance rate."""
    usable = [t for t in texts if finished(t)] if cfg.finished_only else texts
    passing = [t for t in usable if world.check_constraint(constraints, t)]
    if passing:
        return passing[0], True, False, len(passing)
    first = (usable or texts or [None])[0]
    if cfg.oracle_fallback:
        rewrite = world.constraints.apply(constraints, first or "Yes.")
        if world.check_constraint(constraints, rewrite):
            return rewrite, True, True, 0
    return first, False, False, 0


def finished(reply: str) -> bool:
    """Does the reply end a sentence? A last character that is a letter or a digit means it stopped mid-way."""
    return bool(reply) and not reply[-1].isalnum()


def training_dialogs(conversations: list[Conversation]) -> list[list[Message]]:
    """Steps 4-5: one training dialog per conversation with an accepted reply."""
    return [c.training_dialog() for c in conversations if any(c.accepted)]


def run(cfg: Config) -> TrainResult:
    """Synthesise GAtt data with the current chat model, then fine-tune it (resumes the fine-tuning)."""
    started = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_file = out / "gatt_train.jsonl"
    source = model_dir(cfg.init_from)
    if not (out / "report.json").is_file():
        # 1-3. dialogs, instructions, replies sampled by the current model and filtered by the checker
        world = ToyWorld(cfg.data.world_seed)
        llm = Llama.load(source)
        instructions = sample_instructions(cfg.data, world, cfg.data.dialogs)
        turns = user_turns(cfg.data, world, len(instructions))
        conversations = [Conversation(cs, text, users) for (cs, text), users in zip(instructions, turns, strict=True)]
        stats = sample_replies(llm, world, conversations, cfg.data)
        # 4-5. one training dialog per conversation; the loss is on its accepted replies only
        dialogs = training_dialogs(conversations)
        if not dialogs:
            raise ValueError("gatt: the checker accepted no sampled reply; the chat model cannot follow any "
                             "instruction yet (train SFT longer, or raise data.samples_per_turn)")
        write_chat(train_file, dialogs)
        model_accepted = stats["turns_accepted"] - stats["oracle_fallbacks"]
        report = {**stats, "acceptance_rate": stats["replies_passing"] / max(1, stats["replies_sampled"]),
                  "turn_acceptance_rate": model_accepted / max(1, stats["turns_sampled"]),
                  "dialogs": len(conversations), "training_dialogs": len(dialogs),
                  "dialogs_with_all_turns_accepted": sum(len(c.users) == sum(c.accepted) for c in conversations),
                  "sampling_seconds": round(time.perf_counter() - started, 1)}
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        rewrites = f" (+{stats['oracle_fallbacks']} oracle rewrites)" if stats["oracle_fallbacks"] else ""
        print(f"gatt: the checker accepted {stats['replies_passing']} of {stats['replies_sampled']} sampled replies; "
              f"{model_accepted} of {stats['turns_sampled']} turns have one{rewrites}; {len(dialogs)} training "
              "dialogs", file=sys.stderr)
        del llm
    # 6. fine-tune through the SFT path
    finetune = sft.Config(out_dir=str(out), init_from=str(source), epochs=cfg.epochs,
                          data=sft.SFTData(train_files=[str(train_file), *cfg.mix_files], seed=cfg.data.seed,
                                           block_diagonal=cfg.block_diagonal),
                          train=cfg.train)
    return sft.run(finetune)
