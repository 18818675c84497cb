"""Benchmark tasks: lm-eval's prompts on real records, exact log-likelihoods, and every task through `llama2 eval`."""

import json
import math

import pytest
import torch

from llama2 import Llama, ModelArgs, Tokenizer, Transformer
from llama2.cli import main
from llama2.evaluation.benchmark_data import read_gsm8k, read_openbookqa, read_piqa
from llama2.evaluation.gsm8k import build_prompt
from llama2.evaluation.loglikelihood import encode_pair, loglikelihoods
from llama2.evaluation.scoring import exact_match
from llama2.evaluation.win_rate import FunctionJudge, Sampling, as_judge, compare, prompt_dialog
from llama2.model.checkpoint import save_hf


def _checkpoint(path, tokenizer_path, seed):
    tok = Tokenizer(tokenizer_path)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                  multiple_of=16, max_seq_len=512))
    model.init_weights(seed)
    save_hf(model, path, tokenizer_model=tokenizer_path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama2_tokenizer_path):
    return _checkpoint(tmp_path_factory.mktemp("model"), llama2_tokenizer_path, seed=1)


@pytest.fixture(scope="module")
def llm(model_dir):
    return Llama.load(model_dir)


# -------------------------------------------------------------------------------- prompts = lm-eval's prompts


def test_piqa_items_match_lm_eval_template(shared_data):
    items = read_piqa(shared_data / "piqa")
    assert len(items) == 1838
    # lm-eval 0.4.13 piqa, doc 0, as logged by simple_evaluate(log_samples=True): (context, continuation) pairs
    assert items[0].context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert " " + items[0].choices[0] == (
        " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will"
        " also need to supply it with a water bottle and a food dish.")
    assert items[0].gold == 0
    # whitespace inside and after a solution is kept, as the dataset has it
    assert items[1].context == "Question: dresser\nAnswer:"
    assert items[1].choices == ["replace drawer with bobby pin ", "finish, woodgrain with  bobby pin "]
    assert items[1].gold == 1


def test_openbookqa_items_match_lm_eval_template(shared_data):
    items = read_openbookqa(shared_data / "openbookqa")
    assert len(items) == 500
    # openbookqa.yaml: doc_to_text question_stem, doc_to_choice choices.text, target index of answerKey
    assert items[0].context == ("A person wants to start saving money so that they can afford a nice vacation at the"
                                " end of the year. After looking over their budget and expenses, they decide the best"
                                " way to save money is to")
    assert items[0].choices == ["make more phone calls", "quit eating lunch out", "buy less with monopoly money",
                                "have lunch with friends"]
    assert items[0].gold == 1
    assert items[1].context == "There is most likely going to be fog around:"
    assert items[1].choices == ["a marsh", "a tundra", "the plains", "a desert"] and items[1].gold == 0


def test_gsm8k_cot_prompt_matches_lm_eval_layout(shared_data):
    problems = read_gsm8k(shared_data / "gsm8k")
    prompt = build_prompt("cot", problems, 0, num_fewshot=2, seed=0)
    assert prompt == (
        "Q: There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done,"
        " there will be 21 trees. How many trees did the grove workers plant today?\nA: There are 15 trees"
        " originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6."
        " The answer is 6.\n\n"
        "Q: If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?\n"
        "A: There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.\n\n"
        "Q: Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her"
        " friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck"
        " egg. How much in dollars does she make every day at the farmers' market?\nA:")
    plain = build_prompt("plain", problems, 0, num_fewshot=1, seed=0)
    assert plain.startswith("Question: ") and plain.endswith(f"\n\nQuestion: {problems[0].question}\nAnswer:")
    assert "\nAnswer: " in plain and "#### " in plain  # the shot is a full GSM8K solution


# ------------------------------------------------------------------------------------------ log-likelihoods


def test_encode_pair_moves_trailing_space_and_handles_empty_context(llama2_tokenizer_path):
    tok = Tokenizer(llama2_tokenizer_path)
    assert encode_pair(tok, "Answer: ", "yes") == encode_pair(tok, "Answer:", " yes")
    req = encode_pair(tok, "Question: Why?\nAnswer:", " Because.")
    assert req.context == tok.encode("Question: Why?\nAnswer:", bos=True, eos=False)
    assert req.context + req.continuation == tok.encode("Question: Why?\nAnswer: Because.", bos=True, eos=False)
    assert encode_pair(tok, "", "Hello").context == [tok.bos_id]


def test_loglikelihoods_equal_direct_computation_at_any_batch_size(llm):
    pairs = [("Question: How?\nAnswer:", " With a spoon."), ("Hi", " there"), ("", "Hello world"),
             ("A much longer context that needs padding in a batch", " end")]
    batched = loglikelihoods(llm, pairs, batch_size=3)
    single = loglikelihoods(llm, pairs, batch_size=1)
    assert [ll for ll, _ in batched] == pytest.approx([ll for ll, _ in single], abs=1e-4)
    assert [g for _, g in batched] == [g for _, g in single]
    for (context, continuation), (ll, greedy) in zip(pairs, batched, strict=True):
        req = encode_pair(llm.tokenizer, context, continuation)
        ids = torch.tensor([req.context + req.continuation])
        with torch.no_grad():
            logprobs = torch.log_softmax(llm.model(ids[:, :-1])[0], dim=-1)  # (T-1, V)
        n = len(req.continuation)
        target = ids[0, -n:]
        expected = logprobs[-n:].gather(1, target[:, None]).sum().item()
        assert ll == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((logprobs[-n:].argmax(-1) == target).all())


# ---------------------------------------------------------------------------------- tasks through the CLI


def test_piqa_and_openbookqa_end_to_end(model_dir, shared_data, tmp_path):
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(model_dir), "--task", "piqa,openbookqa", "--limit", "4", "--json", str(out),
                 "--out", str(tmp_path / "per_example"), "--batch-size", "8"]) == 0
    results = json.loads(out.read_text())
    for name in ("piqa", "openbookqa"):
        r = results[name]
        assert r["n"] == 4 and r["num_fewshot"] == 0
        assert r["acc"] in (0.0, 0.25, 0.5, 0.75, 1.0) and r["acc_norm"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        lines = (tmp_path / "per_example" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 4
        assert sum(json.loads(x)["pred"] == json.loads(x)["gold"] for x in lines) == r["acc"] * 4
    # the same seed evaluates the same examples: the numbers repeat exactly
    again = tmp_path / "again.json"
    main(["eval", "--model", str(model_dir), "--task", "piqa", "--limit", "4", "--json", str(again)])
    assert json.loads(again.read_text())["piqa"]["acc_norm"] == results["piqa"]["acc_norm"]


def test_fewshot_multiple_choice_runs(model_dir, shared_data, tmp_path):
    out = tmp_path / "r.json"
    main(["eval", "--model", str(model_dir), "--task", "openbookqa", "--limit", "2", "--option", "num_fewshot=2",
          "--json", str(out)])
    assert json.loads(out.read_text())["openbookqa"]["num_fewshot"] == 2


def test_gsm8k_end_to_end(model_dir, shared_data, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(model_dir), "--task", "gsm8k", "--limit", "4", "--option", "max_gen_len=12",
                 "--json", str(out), "--out", str(tmp_path)]) == 0
    r = json.loads(out.read_text())["gsm8k"]
    assert (r["n"], r["num_fewshot"], r["prompt"]) == (4, 8, "cot")
    records = [json.loads(x) for x in (tmp_path / "gsm8k.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all("Q:" not in x["reply"] for x in records)
    assert r["exact_match_flexible"] == sum(exact_match(x["flexible"], x["reference"]) for x in records) / 4


def test_perplexity_end_to_end_matches_direct_computation(model_dir, llm, tmp_path):
    text = "The river Olm flows past the capital.\n\nA second document about owls and boats.\n"
    data = tmp_path / "docs.txt"
    data.write_text(text)
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(model_dir), "--task", "perplexity", "--data", str(data),
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())["perplexity"]
    total, n_tokens = 0.0, 0
    for doc in ("The river Olm flows past the capital.", "A second document about owls and boats."):
        ids = torch.tensor([llm.tokenizer.encode(doc, bos=True, eos=False)])
        with torch.no_grad():
            logprobs = torch.log_softmax(llm.model(ids[:, :-1])[0], dim=-1)
        total += logprobs.gather(1, ids[0, 1:, None]).sum().item()
        n_tokens += ids.shape[1] - 1
    assert r["tokens"] == n_tokens and r["documents"] == 2
    assert r["token_perplexity"] == pytest.approx(math.exp(-total / n_tokens), rel=1e-4)
    n_bytes = len(b"The river Olm flows past the capital.A second document about owls and boats.")
    assert r["bits_per_byte"] == pytest.approx(-total / (n_bytes * math.log(2)), rel=1e-4)


def test_strided_perplexity_on_a_long_document(model_dir, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"text": " ".join(f"word{i}" for i in range(400))}) + "\n")
    results = {}
    for stride in (512, 128):
        out = tmp_path / f"r{stride}.json"
        main(["eval", "--model", str(model_dir), "--task", "perplexity", "--data", str(data), "--option",
              f"stride={stride}", "--json", str(out)])
        results[stride] = json.loads(out.read_text())["perplexity"]
    assert results[512]["tokens"] == results[128]["tokens"] > 512  # longer than one window
    assert results[512]["token_perplexity"] != results[128]["token_perplexity"]  # more context changes the score
    assert all(math.isfinite(r["bits_per_byte"]) for r in results.values())


# -------------------------------------------------------------------------------------------------- win rate


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    from llama2.data.toyworld import ToyWorld

    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    prompts = ToyWorld(0).eval_prompts("helpful", 3)
    path.write_text("".join(json.dumps({"messages": p.messages}) + "\n" for p in prompts))
    return path


def test_win_rate_against_itself_is_all_ties(model_dir, prompts_file, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(model_dir), "--task", "win_rate", "--data", str(prompts_file),
                 "--option", f"baseline={model_dir}", "--option", "judge=oracle:helpfulness",
                 "--option", "max_gen_len=8", "--batch-size", "1", "--json", str(out), "--out", str(tmp_path)]) == 0
    r = json.loads(out.read_text())["win_rate"]
    assert (r["win_rate"], r["ties"], r["n"]) == (0.5, 3, 3)
    records = [json.loads(x) for x in (tmp_path / "win_rate.jsonl").read_text().splitlines()]
    assert all(x["reply"] == x["baseline_reply"] for x in records)  # same seed, same model, same replies


def test_compare_accepts_any_callable_judge(llm, tmp_path, llama2_tokenizer_path):
    other = Llama.load(_checkpoint(tmp_path / "other", llama2_tokenizer_path, seed=2))
    dialogs = [prompt_dialog([{"role": "user", "content": "Name a land."}, {"role": "assistant", "content": "X"}]),
               [{"role": "user", "content": "Count to three."}]]
    assert dialogs[0] == [{"role": "user", "content": "Name a land."}]
    summary, records = compare(llm, other, dialogs, lambda dialog, reply: len(reply), Sampling(max_gen_len=6),
                               batch_size=2)
    expected = sum((len(x["reply"]) > len(x["baseline_reply"])) + 0.5 * (len(x["reply"]) == len(x["baseline_reply"]))
                   for x in records) / 2
    assert summary["win_rate"] == expected
    assert isinstance(as_judge(lambda d, r: 0.0), FunctionJudge)
    judge = FunctionJudge(lambda d, r: 1)
    assert as_judge(judge) is judge


def test_unknown_judge_and_missing_options_fail_clearly(model_dir, prompts_file, capsys):
    assert main(["eval", "--model", str(model_dir), "--task", "win_rate", "--data", str(prompts_file),
                 "--option", f"baseline={model_dir}", "--option", "judge=rm:/nowhere"]) == 1
    assert "unknown judge 'rm:/nowhere'" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--task", "win_rate", "--data", str(prompts_file)]) == 1
    assert "--option baseline=" in capsys.readouterr().err
