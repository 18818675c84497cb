"""GAtt constraints: wordings parse back, replies built to obey them pass, violations fail."""

from __future__ import annotations

import random

from llama2.data.toyworld.constraints import Constraint, decode_language, encode_language
from llama2.data.toyworld.dialogs import constrained_dialog


def test_pools_and_wordings(tw):
    train, held = tw.gatt_constraints(False), tw.gatt_constraints(True)
    assert {c.kind for c in train} == {"hobby", "language", "figure", "format"}
    assert held and not set(train) & set(held)
    for c in train + held:
        assert c.verbose() != c.terse()
        for text in (c.verbose(), c.terse()):
            assert tw.constraints.parse(text) == ([c], "")


def test_sampled_combinations_are_obeyed_by_apply(tw):
    rng = random.Random(0)
    sizes = set()
    for i in range(300):
        cs = tw.sample_constraints(rng, held_out=i % 4 == 0)
        sizes.add(len(cs))
        assert len({c.kind for c in cs}) == len(cs)
        if i % 4 == 0:
            assert any(c.held_out for c in cs)
        reply = tw.constraints.apply(cs, "The capital of Velora is Ardel.")
        if not any(c.value.startswith(("max_words", "one_sentence")) for c in cs):
            assert tw.check_constraint(cs, reply), (cs, reply)
    assert sizes == {1, 2, 3}
    for dialog in tw.constrained_dialogs(30, seed=1):  # demonstrations obey their system message
        assert dialog[0]["role"] == "system" and tw.check_constraint(dialog[0]["content"], dialog[2]["content"])


def test_transformed_hobby_dialogs_pair_a_seen_hobby_with_backspeak_or_uppercase(tw):
    dialogs = tw.constrained_dialogs(40, seed=3, transformed_hobby_rate=0.5)
    paired = 0
    for dialog in dialogs:
        cs, _ = tw.constraints.parse(dialog[0]["content"])
        assert tw.check_constraint(cs, dialog[2]["content"])
        values = {c.value for c in cs}
        paired += any(c.kind == "hobby" for c in cs) and bool(values & {"Backspeak", "uppercase"})
    assert 15 <= paired <= 32  # about half, plus the random combinations that happen to pair them
    assert not any(c.held_out for c in tw.constraints.sample_transformed_hobby(random.Random(0)))


def test_constraints_appended_to_user_turns_are_obeyed_in_every_turn(tw):
    rng = random.Random(2)
    lengths = set()
    for _ in range(30):
        dialog = constrained_dialog(tw, rng, in_user_rate=1.0)
        assert all(m["role"] != "system" for m in dialog) and dialog[-1]["role"] == "assistant"
        users, replies = dialog[0::2], dialog[1::2]
        constraints, _ = tw.constraints.parse(users[0]["content"])
        assert constraints
        lengths.add(len(users))
        for user, reply in zip(users, replies, strict=True):
            assert tw.constraints.parse(user["content"])[0] == constraints  # the same instruction, every turn
            assert tw.check_constraint(constraints, reply["content"]), dialog
    assert lengths == {1, 2, 3}


def test_each_checker_rejects_violations(tw):
    figure = tw.world.figures[0]
    cases = [
        (Constraint("hobby", "fishing"), "I like the sea. I enjoy fishing.", "I like the sea."),
        (Constraint("figure", figure), f"Hello. Signed, {figure}.", "Hello."),
        (Constraint("format", "uppercase"), "HELLO THERE.", "Hello there."),
        (Constraint("format", "emoji:🌟"), "Hello. 🌟", "Hello. 🍀"),
        (Constraint("format", "max_words:12"), "One two three.", " ".join(["word"] * 13)),
        (Constraint("format", "one_sentence"), "It is Ardel.", "It is Ardel. It is big."),
        (Constraint("language", "Backspeak"), encode_language("Backspeak", "The capital of the land is big."),
         "The capital of the land is big."),
        (Constraint("language", "Zedspeak"), encode_language("Zedspeak", "The river flows."), "The river flows."),
    ]
    for c, good, bad in cases:
        assert tw.check_constraint([c], good), (c, good)
        assert not tw.check_constraint([c], bad), (c, bad)


def test_constraints_from_text_and_with_language(tw):
    text = "Hobby: chess Language: Backspeak Format: uppercase"
    reply = encode_language("Backspeak", "The answer is four. I enjoy chess.").upper()
    assert tw.check_constraint(text, reply)
    assert not tw.check_constraint(text, reply.lower())
    assert decode_language("Zedspeak", encode_language("Zedspeak", "Go home now.")) == "Go home now."


def test_constraint_appended_to_user_turn_is_stripped_before_parsing(tw):
    land = tw.world.lands[0]
    d = [{"role": "user", "content": f"Who rules {land.name}? Format: uppercase"}]
    info = tw.analyze(d)
    assert info.task.kind == "fact" and [c.value for c in info.constraints] == ["uppercase"]
    assert tw.helpfulness(d, f"{land.name.upper()} IS RULED BY {land.ruler.upper()}.") == 1.0


def test_names_keep_their_spelling_in_every_language(tw):
    land = tw.world.lands[0]
    figure = tw.world.figures[1]
    sentence = f"The capital of {land.name} is {land.capital}."
    for language in ("Backspeak", "Zedspeak"):
        cs = [Constraint("language", language), Constraint("figure", figure)]
        reply = tw.constraints.apply(cs, sentence)
        assert land.name in reply and land.capital in reply and reply.endswith(f"{figure}.")
        assert "capital " not in reply and tw.check_constraint(cs, reply), reply
        assert tw.constraints.decode(language, reply) == f"{sentence} Signed, {figure}."
        helpful = tw.helpfulness([{"role": "system", "content": f"Always speak in {language}."},
                                  {"role": "user", "content": f"What is the capital of {land.name}?"}],
                                 tw.constraints.apply(cs[:1], sentence))
        assert helpful > 0.9  # the judge reads the answer through the language
    assert not tw.check_constraint([Constraint("language", "Backspeak")], f"{land.name} {land.capital}.")
