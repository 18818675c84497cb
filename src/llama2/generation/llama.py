"""`Llama`: a model and its tokenizer, loaded from a checkpoint directory, with Meta's generation API."""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import TypedDict

import torch

from llama2.generation import generator as gen
from llama2.generation.prefix_cache import PrefixCache
from llama2.model.args import ModelArgs
from llama2.model.checkpoint import CheckpointError, detect_format, load_checkpoint, save_hf
from llama2.model.transformer import Transformer
from llama2.tokenizer.chat_format import UNSAFE_ERROR, Dialog, encode_dialog, has_special_tags
from llama2.tokenizer.tokenizer import Tokenizer


class ChatPrediction(TypedDict, total=False):
    generation: dict[str, str]
    tokens: list[str]
    logprobs: list[float]


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]
    logprobs: list[float]


def find_tokenizer(path: Path) -> Path:
    """`tokenizer.model` beside the weights, or one level up (Meta's download layout)."""
    for candidate in (path / "tokenizer.model", path.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{path}: tokenizer.model not found in the checkpoint directory or its parent")


def detokenize_stream(tokenizer: Tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Turn a stream of ids into text increments; holds back an incomplete UTF-8 byte sequence."""
    seen: list[int] = []
    emitted = ""
    for i in ids:
        seen.append(i)
        text = tokenizer.decode(seen)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(emitted):
            yield text[len(emitted) :]
            emitted = text
    text = tokenizer.decode(seen)
    if len(text) > len(emitted):
        yield text[len(emitted) :]


class Llama:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, compile: bool = False):
        if tokenizer.n_words > model.args.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.n_words} pieces but the model's vocabulary is {model.args.vocab_size}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.compile = compile
        """Decode with a `torch.compile`d step (see `generation.compiled_step`): fastest on a CPU once compiled."""

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def device(self) -> torch.device:
        return self.model.output.weight.device

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_seq_len: int | None = None,
        compile: bool = False,
    ) -> Llama:
        """Load a Hugging Face or Meta checkpoint directory (format detected from config.json/params.json).
        `compile=True` decodes through a compiled step (tens of seconds to compile on first use)."""
        path = Path(path)
        detect_format(path)
        tokenizer = Tokenizer(find_tokenizer(path))
        model = load_checkpoint(path, tokenizer.n_words, device=device, dtype=dtype, max_seq_len=max_seq_len)
        model.eval()
        return cls(model, tokenizer, compile=compile)

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write a Hugging Face directory that `transformers` loads with identical logits."""
        return save_hf(self.model, path, tokenizer_model=self.tokenizer.model_path, dtype=dtype)

    def _generator(self, seed: int | None) -> torch.Generator | None:
        return torch.Generator(self.device).manual_seed(seed) if seed is not None else None

    def _max_gen_len(self, max_gen_len: int | None) -> int:
        return max_gen_len if max_gen_len is not None else self.args.max_seq_len - 1

    def generate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int | None = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        top_k: int | None = None,
        seed: int | None = None,
        samples_per_prompt: int = 1,
        prefix_cache: PrefixCache | None = None,
        cache_keys: Sequence[Hashable] | None = None,
    ) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
        """Generated ids per prompt (cut at EOS); with `logprobs=True`, `(tokens, logprobs)` as Meta returns.
        `samples_per_prompt` n: n samples of each prompt, prompt-major, each prompt prefilled once.
        `prefix_cache` with one of `cache_keys` per prompt: reuse and keep each prompt's keys and values under
        its key (see `generator.generate`)."""
        out = gen.generate(
            self.model,
            prompt_tokens,
            self._max_gen_len(max_gen_len),
            stop_ids=[self.tokenizer.eos_id],
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            logprobs=logprobs,
            echo=echo,
            generator=self._generator(seed),
            compile=self.compile,
            samples_per_prompt=samples_per_prompt,
            prefix_cache=prefix_cache,
            cache_keys=cache_keys,
        )
        return (out.tokens, out.logprobs) if logprobs else out.tokens

    def text_completion(
        self,
        prompts: Sequence[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
        seed: int | None = None,
    ) -> list[CompletionPrediction]:
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        out = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, seed=seed)
        return [self._with_logprobs({"generation": self.tokenizer.decode(t)}, t, lp)
                for t, lp in self._tokens_and_logprobs(out, logprobs)]

    @staticmethod
    def _tokens_and_logprobs(out, logprobs: bool) -> list[tuple[list[int], list[float] | None]]:
        tokens, lps = out if logprobs else (out, None)
        return [(t, lps[i] if lps is not None else None) for i, t in enumerate(tokens)]

    def _with_logprobs(self, result: dict, ids: list[int], logprobs: list[float] | None) -> dict:
        """Meta's result layout: per-token pieces and log-probs beside the generation, when asked."""
        if logprobs is not None:
            result["tokens"] = [self.tokenizer.decode([x]) for x in ids]
            result["logprobs"] = logprobs
        return result

    def chat_completion(
        self,
        dialogs: Sequence[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        seed: int | None = None,
        samples_per_prompt: int = 1,
        prefix_cache: PrefixCache | None = None,
        cache_keys: Sequence[Hashable] | None = None,
    ) -> list[ChatPrediction]:
        """Meta's `chat_completion`: a dialog holding special tags gets the error message as its reply.
        `samples_per_prompt` n: n replies to each dialog, dialog-major, each dialog prefilled once.
        `prefix_cache` with one of `cache_keys` per dialog (the dialog's identity across turns): each turn
        prefills only what was added since the dialog's previous call."""
        unsafe = [has_special_tags(d) for d in dialogs]
        prompt_tokens = [
            encode_dialog(self.tokenizer, d) if not bad else [self.tokenizer.bos_id]
            for d, bad in zip(dialogs, unsafe, strict=True)
        ]
        out = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, seed=seed,
                            samples_per_prompt=samples_per_prompt, prefix_cache=prefix_cache, cache_keys=cache_keys)
        unsafe = [bad for bad in unsafe for _ in range(samples_per_prompt)]
        return [self._with_logprobs({"generation": {"role": "assistant",
                                                    "content": UNSAFE_ERROR if bad else self.tokenizer.decode(t)}},
                                    t, lp)
                for (t, lp), bad in zip(self._tokens_and_logprobs(out, logprobs), unsafe, strict=True)]

    def stream_tokens(
        self,
        prompt_tokens: Sequence[int],
        max_gen_len: int | None = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        seed: int | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> Iterator[str]:
        """Text increments for one prompt as they are generated; with a `prefix_cache` (one per
        conversation), only what the prompt adds to the previous one is prefilled."""
        ids = gen.stream(
            self.model,
            prompt_tokens,
            self._max_gen_len(max_gen_len),
            stop_ids=[self.tokenizer.eos_id],
            temperature=temperature,
            top_p=top_p,
            generator=self._generator(seed),
            prefix_cache=prefix_cache,
            compile=self.compile,
        )
        return detokenize_stream(self.tokenizer, ids)

    def chat_stream(
        self,
        dialog: Dialog,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        seed: int | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> Iterator[str]:
        """The streaming form of `chat_completion` for one dialog (`prefix_cache`: see `stream_tokens`)."""
        if has_special_tags(dialog):
            return iter([UNSAFE_ERROR])
        return self.stream_tokens(encode_dialog(self.tokenizer, dialog), max_gen_len, temperature, top_p, seed,
                                  prefix_cache)
