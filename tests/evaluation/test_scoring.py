"""Pure metric functions against hand-computed cases and lm-eval 0.4.13's formulas."""

import math
import random

import pytest

from llama2.evaluation.benchmark_data import split_obqa_choices
from llama2.evaluation.fewshot import choose_shots, fewshot_context
from llama2.evaluation.scoring import (
    COT_STRICT,
    INVALID,
    PLAIN_STRICT,
    Window,
    exact_match,
    flexible_extract,
    gsm8k_reference,
    paired_difference,
    perplexity_metrics,
    sample_indices,
    score_choices,
    strict_extract,
    strided_windows,
    truncate_at_stop,
    win_rate,
)

# ----------------------------------------------------------------------------------------- acc / acc_norm


def test_acc_and_acc_norm_pick_different_answers():
    # Raw: -10 > -12 picks the short choice. Per character: -10/2 = -5 < -12/8 = -1.5 picks the long one.
    r = score_choices([-10.0, -12.0], ["ab", "abcdefgh"], gold=1)
    assert (r.pred, r.pred_norm) == (0, 1)
    assert (r.acc, r.acc_norm) == (0.0, 1.0)


def test_acc_norm_counts_characters_not_bytes():
    # "éé" is 2 characters but 4 UTF-8 bytes: per character -5/2 = -2.5 < -6/3 = -2 picks choice 1;
    # per byte (lm-eval's acc_bytes) -5/4 = -1.25 would pick choice 0.
    r = score_choices([-5.0, -6.0], ["éé", "abc"], gold=1)
    assert r.pred == 0 and r.pred_norm == 1


def test_ties_go_to_the_first_choice_as_numpy_argmax():
    r = score_choices([-3.0, -3.0, -4.0], ["a", "b", "c"], gold=1)
    assert (r.pred, r.pred_norm) == (0, 0)


def test_score_choices_matches_lm_eval_formula_on_random_cases():
    """lm_eval/api/task.py (0.4.13) ConfigurableTask.process_results, multiple_choice branch:
    completion_len = np.array([float(len(i)) for i in choices])   # line 1494
    pred = np.argmax(lls); pred_norm = np.argmax(lls / completion_len)   # lines 1510-1511
    """
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    for _ in range(200):
        k = rng.randint(2, 5)
        choices = ["x" * rng.randint(1, 40) for _ in range(k)]
        lls = [-rng.uniform(0, 60) for _ in range(k)]
        gold = rng.randrange(k)
        r = score_choices(lls, choices, gold)
        assert r.pred == int(np.argmax(lls))
        assert r.pred_norm == int(np.argmax(np.array(lls) / np.array([float(len(c)) for c in choices])))


def test_score_choices_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        score_choices([-1.0], ["a", "b"], 0)
    with pytest.raises(ValueError):
        score_choices([-1.0, -2.0], ["a", "b"], 2)


# --------------------------------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize("text, expected", [
    ("So 9 * 2 = 18. The answer is 18.", "18"),
    ("The answer is 1,234.\n\n", "1,234"),   # the pattern's final '.' cannot match the newline, so it takes '.'
    ("The answer is -5. Then", "-5."),        # ... but here the class keeps the period and '.' takes the space
    ("The answer is $7.", INVALID),                   # '$' is not in the strict class
    ("I think it is 12.", INVALID),
    ("The answer is 3. Later: The answer is 4.", "3."),  # take_first
])
def test_cot_strict_match(text, expected):
    assert strict_extract(text, COT_STRICT) == expected


@pytest.mark.parametrize("text, expected", [
    ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", "18"),
    ("#### 1,000", "1,000"),
    ("#### -3.5", "-3.5"),
    ("The answer is 18", INVALID),
])
def test_plain_strict_match(text, expected):
    assert strict_extract(text, PLAIN_STRICT) == expected


@pytest.mark.parametrize("text, expected", [
    ("She makes 9 * 2 = $18.", "$18."),    # last match, with '$' and the final period kept
    ("3 apples and 4 pears make 7", "7"),  # single digit: the second alternative's group
    ("he owes -12 coins", "-12"),
    ("1,250 people came", "1,250"),
    ("no numbers here", INVALID),
])
def test_flexible_extract_takes_the_last_number(text, expected):
    assert flexible_extract(text) == expected


def test_exact_match_ignores_commas_dollars_final_period_and_solution():
    reference = gsm8k_reference("She has 16 - 3 = 13 eggs.\n#### 1,018")
    assert reference == "1,018"
    assert exact_match("$1,018.", reference) == 1.0
    assert exact_match("1018", "Work: 1000 + 18 = 1018\n#### 1018") == 1.0
    assert exact_match("-5.", "-5") == 1.0
    assert exact_match("1018.0", reference) == 0.0   # only a *final* period is dropped
    assert exact_match(INVALID, reference) == 0.0


def test_truncate_at_stop():
    assert truncate_at_stop(" 2 + 2 = 4. The answer is 4.\n\nQ: next", ["Q:"]) == " 2 + 2 = 4. The answer is 4.\n\n"
    assert truncate_at_stop("no stop", ["Q:"]) == "no stop"


# ---------------------------------------------------------------------------------------------- perplexity


def test_disjoint_windows_keep_one_token_of_context():
    assert strided_windows(10, 4, 4) == [Window(0, 0, 4), Window(4, 4, 8), Window(6, 8, 10)]


def test_strided_windows_cover_each_target_once_within_max_len():
    for n, max_len, stride in [(10, 4, 2), (1, 8, 8), (37, 8, 3), (8, 8, 1)]:
        windows = strided_windows(n, max_len, stride)
        covered = [t for w in windows for t in range(w.scored_from + 1, w.end + 1)]
        assert covered == list(range(1, n + 1))
        assert all(w.end - w.begin <= max_len for w in windows)
        # every window after the first gives its targets at least max_len - stride ids of context
        assert all(w.scored_from - w.begin + 1 >= min(max_len - stride, w.scored_from) for w in windows[1:])
    with pytest.raises(ValueError):
        strided_windows(10, 4, 5)


def test_perplexity_metrics():
    m = perplexity_metrics(-8 * math.log(2), n_tokens=4, n_bytes=8)
    assert m["token_perplexity"] == pytest.approx(4.0)
    assert m["bits_per_byte"] == pytest.approx(1.0)
    assert m["nll_per_token"] == pytest.approx(2 * math.log(2))


# ----------------------------------------------------------------------------------------- win rate, misc


def test_win_rate_counts_ties_as_half():
    r = win_rate([1.0, 0.0, 0.5, 0.9], [0.0, 0.0, 1.0, 0.2])
    assert (r["wins"], r["ties"], r["losses"]) == (2, 1, 1)
    assert r["win_rate"] == pytest.approx(2.5 / 4)


def test_paired_difference_is_the_mean_change_with_its_standard_error():
    r = paired_difference([0.5, 0.2, 1.0, 0.0], [0.5, 0.6, 1.0, 0.2])  # changes 0, 0.4, 0, 0.2: mean 0.15
    variance = ((0.15**2) * 2 + 0.25**2 + 0.05**2) / 3
    assert r["difference"] == pytest.approx(0.15)
    assert r["standard_error"] == pytest.approx((variance / 4) ** 0.5)
    assert (r["prompts"], r["changed"]) == (4, 2)
    assert paired_difference([0.3, 0.7], [0.3, 0.7]) == {"difference": 0.0, "standard_error": 0.0, "prompts": 2,
                                                         "changed": 0}
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([0.1, 0.2], [0.1])


def test_sample_indices_are_reproducible_sorted_and_distinct():
    a = sample_indices(100, 7, seed=3)
    assert a == sample_indices(100, 7, seed=3) != sample_indices(100, 7, seed=4)
    assert a == sorted(set(a)) and len(a) == 7
    assert sample_indices(5, None, 0) == sample_indices(5, 9, 0) == [0, 1, 2, 3, 4]


def test_fewshot_layout_and_shot_choice():
    assert fewshot_context([("Q: a", "x"), ("Q: b", "y")], "Q: c") == "Q: a x\n\nQ: b y\n\nQ: c"
    shots = choose_shots(10, index=4, k=3, seed=0)
    assert len(set(shots)) == 3 and 4 not in shots and shots == choose_shots(10, 4, 3, 0)
    assert choose_shots(10, 4, 0, 0) == []


def test_split_obqa_choices():
    assert split_obqa_choices("(A) a marsh (B) a tundra (C) the plains (D) a desert") == [
        "a marsh", "a tundra", "the plains", "a desert"]
    with pytest.raises(ValueError):
        split_obqa_choices("(A) one (B) two")
