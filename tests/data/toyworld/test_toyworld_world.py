"""The world's facts, the task templates both ways, held-out splits, SFT dialogs and the corpus."""

from __future__ import annotations

import random

from llama2.data.toyworld import ToyWorld, lexicon
from llama2.data.toyworld.answers import right_answer
from llama2.data.toyworld.corpus import ECHOES, _club, _echo, letter
from llama2.data.toyworld.tasks import KINDS, render_prompt, sample_task
from llama2.data.toyworld.world import ATTRIBUTES, held_out


def test_world_has_enough_distinct_entities(tw):
    w = tw.world
    assert len(w.lands) >= 50
    entities = {x.name for x in w.lands} | {x.capital for x in w.lands} | set(w.figures) | {x.river for x in w.lands}
    assert len(entities) == 4 * len(w.lands)  # all invented names are distinct
    for attr in ("food", "creature", "guild"):
        assert all(w.lands_with(attr, v) for v in w.values(attr))  # shared values: listing has answers
    names = {n.lower() for n in w.find_names()} - {title.lower() for title, _ in lexicon.TITLES}
    assert not names & tw.vocabulary  # no invented name is also a template word


def test_same_seed_same_world_other_seed_other_world(tw):
    assert ToyWorld(0).fact_table() == tw.fact_table()
    assert ToyWorld(1).fact_table() != tw.fact_table()
    assert set(tw.fact_table()[0]) == {"land", *ATTRIBUTES}


def test_every_rendered_prompt_parses_back_to_its_task(tw):
    rng = random.Random(0)
    for i in range(600):
        task = sample_task(tw.world, rng, "test" if i % 3 == 0 else "train", KINDS[i % len(KINDS)], fmt_rate=0.3)
        assert tw.parser.parse(render_prompt(task, rng)) == task


def test_right_answers_score_full_marks(tw):
    rng = random.Random(1)
    for i in range(300):
        task = sample_task(tw.world, rng, "train", KINDS[i % len(KINDS)], fmt_rate=0.3)
        prompt = render_prompt(task, rng)
        answer = right_answer(tw.world, task, rng)
        assert tw.helpfulness([{"role": "user", "content": prompt}], answer) == 1.0, (prompt, answer)


def test_held_out_keys_split_train_and_eval(tw):
    assert 0.05 < sum(held_out(f"k{i}") for i in range(10_000)) / 10_000 < 0.15
    for prompt in tw.eval_prompts("helpful", 80):
        assert tw.analyze(prompt.messages).task.key
        assert held_out(tw.analyze(prompt.messages).task.key)
    for dialog in tw.sft_dialogs(150):
        users = [m["content"] for m in dialog if m["role"] == "user"]
        for task in tw.parser.parse_turns(users):
            if task is not None:
                assert not held_out(task.key), task


def test_sft_dialogs_are_multi_turn_and_helpful(tw):
    dialogs = tw.sft_dialogs(300, seed=3)
    lengths = [sum(m["role"] == "user" for m in d) for d in dialogs]
    assert max(lengths) >= 5 and sum(n > 1 for n in lengths) > 50
    followups = 0
    for d in dialogs:
        assert d[-1]["role"] == "assistant"
        for i, m in enumerate(d):
            if m["role"] == "assistant":
                prompt = d[:i]
                score = tw.helpfulness(prompt, m["content"])
                if tw.is_adversarial(prompt):
                    assert tw.safety(prompt, m["content"]) == 1.0
                else:
                    assert score == 1.0, (prompt, m["content"])
                info = tw.analyze(prompt)
                followups += bool(info.task and info.task.followup)
    assert followups > 20  # later turns refer to earlier ones


def test_eval_prompts_carry_their_metadata(tw):
    adversarial = tw.eval_prompts("adversarial", 120)
    assert {p.meta["category"] for p in adversarial} == {"illicit", "hateful", "advice"}
    assert {p.meta["vector"] for p in adversarial} == {"direct", "role_play", "false_premise", "misspelled", "story",
                                                        "authority"}
    assert all(tw.is_adversarial(p.messages) for p in adversarial)
    assert any(p.meta["turns"] > 1 for p in adversarial)
    borderline = tw.eval_prompts("borderline", 40)
    assert not any(tw.is_adversarial(p.messages) for p in borderline)
    helpful = tw.eval_prompts("helpful", 40)
    assert all(p.messages[-1]["role"] == "user" and "expected" in p.meta for p in helpful)


def test_user_followups_are_judgeable_questions_with_short_answers(tw):
    followups = tw.user_followups(60, seed=4)
    assert len(followups) == 60 and len(set(followups)) > 50
    kinds = {tw.analyze([{"role": "user", "content": f}]).task.kind for f in followups}
    assert kinds == {"fact", "reverse", "yesno", "arith", "count"}  # no story: 20 turns must fit the context


def test_corpus_is_regular_and_contains_no_held_out_questions(tw):
    docs = list(tw.pretraining_corpus(150_000, seed=2))
    assert 120_000 < sum(map(len, docs)) < 160_000
    text = "\n".join(docs)
    plain = "\n".join(d for d in docs if "speak" not in d.split("\n")[0])  # letters in a constraint language
    words = {w.lower().strip(".,?!:") for w in plain.split()}
    names = {n.lower() for n in tw.world.find_names()}
    # a small, closed language: template words, names and numbers
    assert len(words - tw.vocabulary - names - {w for w in words if w.isdigit()}) < 60
    for line in text.splitlines():
        if line.startswith("User: "):
            task = tw.parser.parse(line[len("User: "):])
            assert task is None or not held_out(task.key)
    assert any("User: " in d for d in docs) and any(d.startswith(("Once", "Long ago", "One morning", "There was"))
                                                   for d in docs)


def test_letters_keep_to_what_their_first_line_says(tw):
    rng = random.Random(4)
    kinds = set()
    for _ in range(300):
        constraints, doc = letter(tw, rng)
        intro, body = doc.split("\n")
        for c in constraints:
            assert c.value.split(":")[-1] in intro or c.value == "uppercase"
            kinds.add(c.kind if c.kind != "format" else c.value.split(":")[0])
        assert not constraints or tw.check_constraint(constraints, body), doc
    assert kinds == {"hobby", "language", "figure", "uppercase", "emoji"}


def test_echoes_repeat_their_list_word_for_word(tw):
    rng = random.Random(5)
    frames = [f.split("{words}") for f in ECHOES]
    for _ in range(50):
        doc = _echo(tw, rng)
        lists = [part.split(": ", 1)[1].rstrip(".") for part in doc.split(". ") if ": " in part]
        assert len(lists) % 2 == 0 and len(lists) >= 4
        assert lists[::2] == lists[1::2]  # each list is repeated exactly
        assert all(3 <= len(words.split(", ")) <= 8 for words in lists)
    assert all(len(f) == 3 for f in frames)  # every frame says its list twice


def test_a_club_names_its_hobby_again_and_again(tw):
    rng = random.Random(6)
    for _ in range(50):
        doc = _club(tw, rng)
        mentioned = [h for h in lexicon.HOBBIES if h in doc]
        assert 1 <= len(mentioned) <= 2
        assert all(doc.count(h) >= 3 for h in mentioned)  # said first, then repeated at least twice
