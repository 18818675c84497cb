import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from llama2 import Llama, ModelArgs, Tokenizer, Transformer
from llama2.generation.commands import run_chat
from llama2.model.checkpoint import save_hf
from llama2.tokenizer.chat_format import UNSAFE_ERROR


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=16,
                     max_seq_len=128)
    model = Transformer(args)
    model.init_weights(seed=11)
    # Larger weights make the random model's distribution peaky, so greedy ties are impossible in practice.
    with torch.no_grad():
        model.output.weight.mul_(20)
    path = tmp_path_factory.mktemp("ckpt")
    save_hf(model, path, tokenizer_model=tiny_tokenizer_path)
    return path


@pytest.fixture(scope="module")
def llm(checkpoint):
    return Llama.load(checkpoint)


PROMPTS = [[1, 45, 67, 89, 12], [1, 7], [1, 200, 201, 202, 203, 204, 205, 206, 207], [1, 99, 98]]


def test_greedy_generate_equals_transformers(llm, checkpoint):
    hf = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ours = llm.generate([prompt], max_gen_len=24, temperature=0)[0]
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=2,
                          pad_token_id=0)[0, len(prompt):].tolist()
        if 2 in ref:
            ref = ref[: ref.index(2)]
        assert ours == ref


def test_ragged_batch_equals_each_prompt_alone(llm):
    batch = llm.generate(PROMPTS, max_gen_len=20, temperature=0)
    alone = [llm.generate([p], max_gen_len=20, temperature=0)[0] for p in PROMPTS]
    assert batch == alone
    assert all(2 not in out for out in batch)


def test_logprobs_equal_the_forward_pass_and_echo_returns_the_prompt(llm):
    prompt = PROMPTS[0]
    tokens, logprobs = llm.generate([prompt], max_gen_len=10, temperature=1.0, top_p=1.0, logprobs=True, seed=3)
    full = torch.tensor([prompt + tokens[0]])
    with torch.no_grad():
        ref = -F.cross_entropy(llm.model(full)[0, :-1], full[0, 1:], reduction="none")
    torch.testing.assert_close(torch.tensor(logprobs[0]), ref[len(prompt) - 1 :], atol=1e-5, rtol=1e-5)
    echoed = llm.generate([prompt], max_gen_len=10, temperature=1.0, top_p=1.0, echo=True, seed=3)[0]
    assert echoed == prompt + tokens[0]


def test_sampling_is_reproducible_by_seed(llm):
    a = llm.generate(PROMPTS, max_gen_len=15, temperature=1.0, seed=7)
    assert a == llm.generate(PROMPTS, max_gen_len=15, temperature=1.0, seed=7)
    assert a != llm.generate(PROMPTS, max_gen_len=15, temperature=1.0, seed=8)


def test_streaming_yields_the_same_text_as_chat_completion(llm):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the river Olm"}]
    full = llm.chat_completion([dialog], temperature=0, max_gen_len=30)[0]["generation"]
    assert full["role"] == "assistant"
    pieces = list(llm.chat_stream(dialog, temperature=0, max_gen_len=30))
    assert "".join(pieces) == full["content"]
    assert len(pieces) > 1


@pytest.mark.slow
def test_compiled_streaming_gives_the_eager_tokens_across_turns(checkpoint):
    """`Llama.load(compile=True)` streams through the compiled step (greedy through the screened one, sampled
    through the full logits) with the eager tokens, and a chat's next turn reuses its prefix cache there."""
    from llama2.generation.prefix_cache import PrefixCache

    eager, compiled = Llama.load(checkpoint), Llama.load(checkpoint, compile=True)
    first = [{"role": "user", "content": "the river Olm"}]
    for temperature in (0, 0.8):
        replies = []
        for llm in (eager, compiled):
            cache = PrefixCache()
            reply = "".join(llm.chat_stream(first, temperature=temperature, max_gen_len=12, seed=3,
                                            prefix_cache=cache))
            second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "and then?"}]
            replies.append((reply, "".join(llm.chat_stream(second, temperature=temperature, max_gen_len=12,
                                                           seed=3, prefix_cache=cache))))
        assert replies[0] == replies[1] and replies[0][0]
    kinds = {type(step).__name__ for step in compiled.model._decode_steps.values()}
    assert kinds == {"CompiledGreedyStep", "CompiledDecodeStep"}


def test_special_tags_get_metas_error_message(llm):
    dialogs = [[{"role": "user", "content": "hi [INST] there"}], [{"role": "user", "content": "hi"}]]
    out = llm.chat_completion(dialogs, temperature=0, max_gen_len=5)
    assert out[0]["generation"]["content"] == UNSAFE_ERROR
    assert out[1]["generation"]["content"] != UNSAFE_ERROR


def test_chat_completion_samples_several_replies_per_dialog_in_dialog_major_order(llm):
    dialogs = [[{"role": "user", "content": "hi [INST] there"}], [{"role": "user", "content": "the river Olm"}]]
    repeated = [d for d in dialogs for _ in range(3)]
    expected = llm.chat_completion(repeated, temperature=1.0, max_gen_len=12, seed=4)
    out = llm.chat_completion(dialogs, temperature=1.0, max_gen_len=12, seed=4, samples_per_prompt=3)
    assert out == expected
    assert [o["generation"]["content"] == UNSAFE_ERROR for o in out] == [True] * 3 + [False] * 3


def test_text_completion_with_logprobs(llm):
    out = llm.text_completion(["The river"], temperature=0, max_gen_len=8, logprobs=True)[0]
    assert len(out["tokens"]) == len(out["logprobs"]) and all(lp <= 0 for lp in out["logprobs"])


def test_bad_prompts_are_clear_errors(llm):
    with pytest.raises(ValueError, match="at least one prompt"):
        llm.generate([], max_gen_len=5)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        llm.generate([[]], max_gen_len=5)
    with pytest.raises(ValueError, match="outside"):
        llm.generate([[1, 100000]], max_gen_len=5)
    with pytest.raises(ValueError, match="context is 128"):
        llm.generate([[1] * 200], max_gen_len=5)


def test_save_and_reload_keeps_generations(llm, tmp_path):
    llm.save(tmp_path)
    again = Llama.load(tmp_path)
    assert again.generate(PROMPTS, max_gen_len=10, temperature=0) == llm.generate(PROMPTS, max_gen_len=10,
                                                                                 temperature=0)


def test_chat_loop_keeps_the_dialog_and_resets(llm, monkeypatch):
    seen = []
    real = llm.chat_stream

    def spy(dialog, **kw):
        seen.append([m["role"] for m in dialog])
        return real(dialog, **kw)

    monkeypatch.setattr(llm, "chat_stream", spy)
    inputs = iter(["hello", "again", "/reset", "fresh", "bad [INST]"])

    def read(_prompt):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError from None

    out = []
    run_chat(llm, "Be brief.", read=read, write=out.append, temperature=0, max_gen_len=5)
    assert seen[:3] == [["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    assert UNSAFE_ERROR in "".join(out)
