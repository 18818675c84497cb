"""Preference pairs: rating levels from the oracle gap, noise that grows as the gap shrinks, safety bins."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from llama2.data.toyworld import SAFE_THRESHOLD, flip_probability, rating_level


def test_rating_levels_and_noise_curve():
    assert [rating_level(g) for g in (0.7, 0.3, 0.15, 0.05, 0.0)] == [
        "significantly_better", "better", "slightly_better", "negligibly_better", "negligibly_better"]
    assert flip_probability(0.0) == 0.5
    gaps = [0.0, 0.05, 0.1, 0.25, 0.5]
    probs = [flip_probability(g) for g in gaps]
    assert probs == sorted(probs, reverse=True) and probs[-1] < 0.01
    assert math.isclose(flip_probability(0.1), 0.5 * math.exp(-1.25))


def test_candidates_cover_every_quality(tw):
    helpful = tw.eval_prompts("helpful", 1)[0].messages
    kinds = {c.kind for c in tw.candidates(helpful)}
    assert {"right", "wrong", "partly_right", "verbose", "off_format", "unfinished", "needless_refusal"} <= kinds
    adversarial = tw.eval_prompts("adversarial", 1)[0].messages
    kinds = {c.kind for c in tw.candidates(adversarial)}
    assert {"safe_refusal", "unsafe_compliance", "verbose_compliance", "bare_refusal"} <= kinds


@pytest.fixture(scope="module")
def helpfulness_pairs(tw):
    return tw.preference_pairs("helpfulness", 600, "train")


@pytest.fixture(scope="module")
def safety_pairs(tw):
    return tw.preference_pairs("safety", 600, "train")


def test_rating_distribution(helpfulness_pairs, safety_pairs):
    for pairs in (helpfulness_pairs, safety_pairs):
        share = {k: v / len(pairs) for k, v in Counter(p.rating for p in pairs).items()}
        assert len(share) == 4
        assert 0.25 <= share["negligibly_better"] <= 0.40, share
        assert 0.10 <= share["significantly_better"] <= 0.20, share


def test_labels_follow_the_oracle_up_to_noise(tw, helpfulness_pairs):
    flipped = {level: [] for level in ("significantly_better", "better", "slightly_better", "negligibly_better")}
    for p in helpfulness_pairs:
        gap = tw.helpfulness(p.prompt, p.chosen) - tw.helpfulness(p.prompt, p.rejected)
        if gap:
            flipped[p.rating].append(gap < 0)
    rate = {k: sum(v) / len(v) for k, v in flipped.items()}
    assert rate["significantly_better"] == 0.0 and rate["better"] < 0.05
    assert 0 < rate["slightly_better"] < rate["negligibly_better"] < 0.5  # noise grows as the gap shrinks


def test_safety_bins_and_no_unsafe_over_safe(tw, safety_pairs):
    bins = Counter()
    for p in safety_pairs:
        chosen_safe = tw.safety(p.prompt, p.chosen) >= SAFE_THRESHOLD
        rejected_safe = tw.safety(p.prompt, p.rejected) >= SAFE_THRESHOLD
        assert (p.safety["chosen_safe"], p.safety["rejected_safe"]) == (chosen_safe, rejected_safe)
        assert chosen_safe or not rejected_safe
        bins[(chosen_safe, rejected_safe)] += 1
    n = len(safety_pairs)
    assert 0.12 < bins[(True, False)] / n < 0.25 and 0.38 < bins[(True, True)] / n < 0.56
    assert 0.27 < bins[(False, False)] / n < 0.43
    assert sum(tw.is_adversarial(p.prompt) for p in safety_pairs) > 0.7 * n


def test_filler_does_not_mark_a_reply_as_safe(tw, safety_pairs):
    # padded refusals are safe and padded compliance is not: with only the first, a safety RM learnt that
    # filler means safe, and PPO, rewarded by it on adversarial prompts, padded every answer
    padded = [(tw.safety(p.prompt, reply) >= SAFE_THRESHOLD)
              for p in safety_pairs for reply in (p.chosen, p.rejected) if "I hope this helps." in reply]
    assert padded.count(True) > 10 and padded.count(False) > 10


def test_test_split_uses_held_out_prompts(tw):
    from llama2.data.toyworld.world import held_out

    for p in tw.preference_pairs("helpfulness", 40, "test"):
        task = tw.analyze(p.prompt).task
        assert task is not None and held_out(task.key, 25 if task.kind == "borderline" else 10)
    with pytest.raises(ValueError, match="split"):
        tw.preference_pairs("helpfulness", 1, "dev")


def test_annotating_two_given_responses_ranks_them_like_the_templated_pairs(tw):
    import random

    from llama2.data.toyworld.pairs import annotate_helpfulness

    dialog = [{"role": "user", "content": "What is 17 minus 11?"}]
    right, wrong = "17 - 11 = 6.", "17 - 11 = 7."
    assert tw.helpfulness(dialog, right) - tw.helpfulness(dialog, wrong) >= 0.5
    records = [annotate_helpfulness(tw, dialog, wrong, right, random.Random(i)) for i in range(200)]
    assert all(r.chosen == right and r.rating == "significantly_better" for r in records)  # flips < 0.1% here
    assert annotate_helpfulness(tw, dialog, right, right + " ", random.Random(0)) is None  # nothing to compare
    assert annotate_helpfulness(tw, dialog, right, "", random.Random(0)) is None
    # two equally good answers: a coin toss, rated "negligibly better"
    close = [annotate_helpfulness(tw, dialog, right, "The answer is 6.", random.Random(i)) for i in range(400)]
    assert {r.rating for r in close} == {"negligibly_better"}
    assert 0.4 < sum(r.chosen == right for r in close) / 400 < 0.6


def test_an_unfinished_reply_stops_mid_sentence_and_the_oracle_ranks_it_below_the_right_one(tw):
    """The reply cut before its answer ("The sky whale lives in") is worse than the whole right answer."""
    gaps = []
    for prompt in tw.eval_prompts("helpful", 40):
        by_kind = {c.kind: c.text for c in tw.candidates(prompt.messages)}
        if "unfinished" not in by_kind:
            continue
        cut, right = by_kind["unfinished"], by_kind["right"]
        assert cut[-1].isalnum()  # no closing punctuation: it stopped mid-sentence
        gaps.append(tw.helpfulness(prompt.messages, right) - tw.helpfulness(prompt.messages, cut))
    assert len(gaps) >= 20 and min(gaps) >= 0 and sum(gaps) / len(gaps) > 0.2
