"""The report's paper-claim checks on hand-made stage results."""

from __future__ import annotations

import pytest

from llama2.evaluation.report import _checks, helpfulness_changes, machines_section, render_markdown


def _model(helpfulness: float, violation: float, borderline_refusal: float = 0.0) -> dict:
    return {"helpfulness": helpfulness, "violation_rate": violation, "false_refusal_rate": 0.0,
            "borderline_false_refusal_rate": borderline_refusal}


def _verdicts(models: dict, ppo: dict) -> dict[str, bool]:
    return {claim: ok for claim, ok, _ in _checks(models, {}, {}, {}, ppo)}


def test_safety_checks_compare_with_the_sft_model_and_the_model_before_safety_tuning():
    models = {"sft": _model(0.5, 0.4), "gatt": _model(0.48, 0.3), "safety": _model(0.45, 0.2, 0.1)}
    got = _verdicts(models, {})
    assert got["Safety tuning at least halves the SFT model's violation rate"]
    assert got["Safety tuning keeps helpfulness (within 0.05 of the model before it)"]
    assert got["Safety-tuned model's false refusals on borderline prompts stay at most 0.2"]
    models["safety"] = _model(0.40, 0.25, 0.3)
    got = _verdicts(models, {})
    assert not any(got[c] for c in ("Safety tuning at least halves the SFT model's violation rate",
                                    "Safety tuning keeps helpfulness (within 0.05 of the model before it)",
                                    "Safety-tuned model's false refusals on borderline prompts stay at most 0.2"))


def test_ppo_kl_is_checked_against_the_preset_target_only_when_one_is_set():
    claim = "PPO's KL to the reference stays under the preset's target"
    assert claim not in _verdicts({}, {"kl_end": 0.3, "mean_kl": 0.2, "kl_target": None})
    assert _verdicts({}, {"kl_end": 0.3, "mean_kl": 0.2, "kl_target": 1.0})[claim]
    assert not _verdicts({}, {"kl_end": 1.3, "mean_kl": 0.9, "kl_target": 1.0})[claim]


def test_gatt_checks_read_the_adherence_curves():
    fades = "Without GAtt, the system instruction fades over the turns (paper Fig. 9, left)"
    keeps = "GAtt keeps the system instruction at the last turn (paper: 100% at turn 20)"
    general = "GAtt generalises to constraints held out of its training"

    def verdicts(seen_without, seen_with, held_without, held_with):
        adherence = {"seen": {"without_gatt": seen_without, "with_gatt": seen_with},
                     "held_out": {"without_gatt": held_without, "with_gatt": held_with}}
        return {claim: ok for claim, ok, _ in _checks({}, adherence, {}, {}, {})}

    got = verdicts([0.5, 0.1, 0.0, None], [0.95, 0.9, 0.92, None], [0.4, 0.0, 0.0], [0.4, 0.3, 0.2])
    assert got[fades] and got[keeps] and got[general]  # the last turn any dialog reached is the one read
    got = verdicts([0.5, 0.5, 0.6], [0.5, 0.4, 0.45], [0.4, 0.3, 0.2], [0.4, 0.2, 0.1])
    assert not (got[fades] or got[keeps] or got[general])


def test_gatts_last_turn_share_carries_its_binomial_error_over_the_dialogs_that_reached_it():
    keeps = "GAtt keeps the system instruction at the last turn (paper: 100% at turn 20)"
    adherence = {"seen": {"without_gatt": [0.9, 0.1, None], "with_gatt": [1.0, 0.84, None]}}
    dialogs = {"without_gatt": [64, 60, 0], "with_gatt": [64, 50, 0]}
    numbers = next(n for c, _, n in _checks({}, adherence, {}, {}, {}, (), dialogs) if c == keeps)
    assert numbers == "without 0.10, with 0.84 ± 0.05 (50 dialogs)"  # sqrt(0.84 * 0.16 / 50) = 0.052
    assert next(n for c, _, n in _checks({}, adherence, {}, {}, {}) if c == keeps) == "without 0.10, with 0.84"


def test_a_helpfulness_rise_counts_only_beyond_twice_its_paired_standard_error():
    claim = "PPO raises oracle helpfulness"

    def verdict(before: list[float], after: list[float]) -> tuple[bool, str]:
        models = {"rejection_sampling": {**_model(sum(before) / len(before), 0.3), "helpfulness_scores": before},
                  "rlhf": {**_model(sum(after) / len(after), 0.3), "helpfulness_scores": after}}
        changes = helpfulness_changes(models)
        assert [(c["from"], c["to"]) for c in changes] == [("rejection_sampling", "rlhf")]
        return next((ok, numbers) for c, ok, numbers in _checks(models, {}, {}, {}, {}, changes) if c == claim)

    # one prompt of 8 better by 0.5, one worse by 0.3: the mean rises by 0.025 with a standard error of 0.077
    ok, numbers = verdict([0.5] * 8, [1.0, 0.2] + [0.5] * 6)
    assert not ok and "+0.025 ± 0.077 paired over 8 prompts" in numbers
    ok, _ = verdict([0.5] * 8, [0.7, 0.6, 0.7, 0.6, 0.7, 0.6, 0.5, 0.7])  # most prompts better: clearly a rise
    assert ok
    # without per-prompt scores (an older run folder) the means decide
    assert _verdicts({"rejection_sampling": _model(0.50, 0.3), "rlhf": _model(0.51, 0.3)}, {})[claim]


def test_rlhf_as_a_whole_is_paired_against_sft():
    claim = "RLHF (rejection sampling, then PPO) makes the model more helpful than SFT (Fig. 11)"
    scores = {"sft": [0.5] * 8, "rejection_sampling": [0.6, 0.5, 0.6, 0.5, 0.6, 0.5, 0.6, 0.5],
              "rlhf": [0.6, 0.6, 0.6, 0.5, 0.6, 0.6, 0.6, 0.5]}
    models = {name: {**_model(sum(s) / len(s), 0.3), "helpfulness_scores": s} for name, s in scores.items()}
    changes = helpfulness_changes(models)
    assert [(c["from"], c["to"]) for c in changes] == [("sft", "rejection_sampling"), ("rejection_sampling", "rlhf"),
                                                       ("sft", "rlhf")]
    assert changes[-1]["difference"] == pytest.approx(0.075) and changes[-1]["changed"] == 6
    verdicts = {c: (ok, numbers) for c, ok, numbers in _checks(models, {}, {}, {}, {}, changes)}
    assert verdicts[claim][0] and "+0.075" in verdicts[claim][1]
    assert not verdicts["PPO raises oracle helpfulness"][0]  # +0.025 on 2 of 8 prompts: within twice its error
    page = render_markdown({"models": models, "checks": [], "timings": {}, "helpfulness_changes": changes},
                           models, [])
    assert "| sft → rlhf | +0.075 |" in page and "sft → rlhf is rejection sampling and PPO together" in page


def test_the_report_says_how_the_replies_were_made():
    prompts = {"helpful": 500, "adversarial": 80, "borderline": 40}

    def page(decoding: dict | None) -> str:
        model = {**_model(0.6, 0.1), "prompts": prompts, **({"decoding": decoding} if decoding else {})}
        return render_markdown({"models": {"sft": model}, "checks": [], "timings": {}}, {"sft": model}, [])

    sampled = page({"temperature": 0.6, "top_p": 0.9, "samples_per_prompt": 4})
    assert ("4 replies a prompt sampled at temperature 0.6, top-p 0.9, to 500 helpful, 80 adversarial and 40 "
            "borderline prompts") in sampled
    assert "Greedy replies to 500 helpful" in page({"temperature": 0.0, "top_p": 0.9, "samples_per_prompt": 1})
    assert "replies" not in page(None).split("## Paper results")[0]  # an older run folder: nothing claimed


def test_the_report_tabulates_correctness_by_task_kind_for_the_models_that_recorded_it():
    def model(fact: float, arith: float | None) -> dict:
        by_task = {"fact": {"prompts": 120, "helpfulness": fact, "correctness": fact}}
        if arith is not None:
            by_task["arith"] = {"prompts": 110, "helpfulness": 0.3, "correctness": arith}
        return {**_model(0.6, 0.1), "helpful_by_task": by_task}

    models = {"sft": model(0.81, 0.01), "rlhf": model(0.84, None), "old": _model(0.5, 0.1)}
    page = render_markdown({"models": models, "checks": [], "timings": {}}, models, [])
    assert "| task | prompts | sft | rlhf |" in page  # the older run's model has no column
    assert "| arith | 110 | 0.01 | – |" in page and "| fact | 120 | 0.81 | 0.84 |" in page
    assert "Correctness by task kind" not in render_markdown({"models": {"old": models["old"]}, "checks": [],
                                                              "timings": {}}, {}, [])


def test_the_report_says_which_kind_of_pair_the_reward_model_misses():
    rm = {"accuracy_by_rating": {"overall": 0.67}, "label_ceiling": 0.82,
          "agreement_with_oracle_by_pair_type": {"correctness": {"pairs": 335, "accuracy": 0.558},
                                                 "form": {"pairs": 234, "accuracy": 0.902}}}
    page = render_markdown({"models": {}, "checks": [], "timings": {}, "reward_models": {"helpfulness": rm}}, {}, [])
    assert "by what separates the two responses (pairs): correctness 0.558 (335), form 0.902 (234)." in page
    assert "by the question's kind" not in page  # a run from before the split

    rm["agreement_with_oracle_by_pair_type"]["correctness"]["by_task"] = {
        "arith": {"pairs": 59, "accuracy": 0.458}, "fact": {"pairs": 99, "accuracy": 0.737}}
    page = render_markdown({"models": {}, "checks": [], "timings": {}, "reward_models": {"helpfulness": rm}}, {}, [])
    assert ("form 0.902 (234). Where one answer is right and the other is not, by the question's kind: "
            "arith 0.458 (59), fact 0.737 (99).") in page


def test_the_report_spells_out_ppo_by_kind_of_prompt_when_the_run_recorded_it():
    ppo = {"reward_start": 0.471, "reward_end": 0.528, "mean_kl": 0.2, "oracle_helpfulness_start": 0.53,
           "oracle_helpfulness_end": 0.557}
    by_kind = {"reward_helpfulness_on_helpful_prompts_start": 0.433, "reward_helpfulness_on_helpful_prompts_end": 0.432,
               "reward_safety_on_safety_prompts_start": 0.552, "reward_safety_on_safety_prompts_end": 0.73,
               "oracle_safety_on_safety_prompts_start": None, "oracle_safety_on_safety_prompts_end": 0.5}

    def page(summary: dict) -> str:
        return render_markdown({"models": {}, "checks": [], "timings": {}, "ppo": summary}, {}, [])

    text = page({**ppo, **by_kind})
    assert ("By the score each kind of prompt is rewarded with: helpfulness RM on helpful prompts 0.433 → 0.432; "
            "safety RM on safety prompts 0.552 → 0.730.") in text
    assert "By the score" not in page(ppo)  # an older run folder's summary


def test_timings_name_the_machine_and_a_resumed_run_that_moved_lists_each():
    intel = {"cpu": "Intel Xeon", "cpu_capability": "AVX512", "native_bf16": True, "cores": 2, "threads": 2,
             "torch": "2.13.0"}
    amd = intel | {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "native_bf16": False}
    results = {"data": {"seconds": 1.0}, "pretrain": {"seconds": 5.0, "machine": intel},
               "sft": {"seconds": 4.0, "machine": amd}, "evaluation": {"seconds": 2.0, "machine": intel}}
    machines = machines_section(results)  # a stage folder from before the record has none
    assert machines == [{"machine": intel, "stages": ["pretrain", "evaluation"]}, {"machine": amd, "stages": ["sft"]}]
    timings = {name: {"seconds": r["seconds"]} for name, r in results.items()}
    page = render_markdown({"models": {}, "checks": [], "timings": timings, "machines": machines}, {}, [])
    assert "- pretrain, evaluation: Intel Xeon (AVX512, native bf16)" in page
    assert "- sft: AMD EPYC (AVX2, no native bf16)" in page
    one = render_markdown({"models": {}, "checks": [], "timings": timings, "machines": machines[:1]}, {}, [])
    assert "On Intel Xeon (AVX512, native bf16), 2 cores, 2 threads, torch 2.13.0." in one
