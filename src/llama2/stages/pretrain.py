"""Pretraining (SPEC §3): next-token prediction on packed text, from randomly initialised weights.

setup → loop → cleanup: tokenize the text once into a cached token file, cut it into shuffled windows of
`max_seq_len + 1` tokens, build the model from a preset, and hand everything to the shared engine.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from llama2.config import dump_config
from llama2.data.packing import all_windows, build_token_file, collate_windows, split_windows
from llama2.data.sampler import ShuffledBatches, sequential_batches
from llama2.model.args import ModelArgs
from llama2.model.transformer import Transformer
from llama2.stages.export import hf_exporter
from llama2.tokenizer.tokenizer import Tokenizer
from llama2.training.loop import TrainConfig, Trainer, TrainResult
from llama2.training.losses import Metrics, causal_lm_loss, packed_chat_loss
from llama2.training.parallel import DistEnv, broadcast_object, distributed_run


@dataclass
class ModelConfig:
    """The shape to train from scratch: a named preset with optional changes."""

    preset: str = "toy-smoke"
    """A `ModelArgs` preset: toy-smoke, toy-demo, tiny, stories15M, 1B, 7B, 13B, 34B, 70B."""
    dim: int | None = None
    """Residual width (None: the preset's)."""
    n_layers: int | None = None
    """Number of transformer blocks (None: the preset's)."""
    n_heads: int | None = None
    """Query heads (None: the preset's)."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (None: the preset's)."""
    max_seq_len: int | None = None
    """Context length, which is also the training window (None: the preset's; Llama 2: 4096)."""
    init_seed: int = 0
    """Seed of the weight initialisation (`Transformer.init_weights`)."""

    def build_args(self, vocab_size: int) -> ModelArgs:
        """The preset with these changes; the vocabulary always comes from the tokenizer."""
        changes = {k: getattr(self, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")}
        return ModelArgs.from_preset(self.preset, vocab_size=vocab_size,
                                     **{k: v for k, v in changes.items() if v is not None})


@dataclass
class DataConfig:
    """Where the text comes from and how it is split."""

    train_files: list[str] = field(default_factory=list)
    """Text files: `.txt` (documents separated by blank lines) or `.jsonl` with a `text` field."""
    tokenizer: str = ""
    """A SentencePiece `tokenizer.model` (or the folder holding it)."""
    val_files: list[str] = field(default_factory=list)
    """Held-out text files for validation; when empty, `val_fraction` of the training stream is held out."""
    val_fraction: float = 0.01
    """Share of the token windows held out for validation (the stream's tail), used without `val_files`."""
    cache_dir: str | None = None
    """Where the tokenized stream is cached (None: `<out_dir>/token_cache`)."""
    seed: int = 0
    """Seed of the window order (each epoch reshuffles from (seed, epoch))."""
    document_mask_steps: int = 0
    """The first this many steps, each document attends only to itself within its window (a block-diagonal
    causal mask cut at every BOS); the steps after it, and every step with 0, attend causally over the whole
    window, as llama-recipes and most pretraining code pack text (SPEC is silent; Llama 3 masks documents).
    On a CPU the tiled masked attention skips what other documents would add: a demo-shaped compiled step
    (4 × 1024 tokens, documents of ~68 tokens) ran 1.27-1.33× faster on the 2-core AVX2 EPYC. A model masked
    to the end is lost when it reads a long window as one sequence, as inference reads a long dialog; a causal
    tail teaches it to (docs/training.md). Validation reads each document alone whenever this is above 0. A
    GPU takes one masked SDPA call, slower than the causal kernel."""


@dataclass
class Config:
    """`llama2 pretrain`: a model shape, a corpus and the engine's settings."""

    out_dir: str = "runs/pretrain"
    """Run directory: checkpoints, metrics.jsonl, config.yaml. Re-running on it resumes."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to train."""
    data: DataConfig = field(default_factory=DataConfig)
    """The pretraining text."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, schedule, precision, parallelism, logging and checkpoints."""


class DocumentMaskedSteps:
    """The sampler's micro-batches with their `doc_ids` for the first `steps` optimizer steps, without them
    after. The step is read from the sampler's own position, so a resumed run switches at the same step."""

    def __init__(self, batches: ShuffledBatches, steps: int):
        self.batches, self.steps = batches, steps

    def __iter__(self) -> DocumentMaskedSteps:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        step = self.batches.examples_drawn // self.batches.global_batch_size
        batch = next(self.batches)
        if step >= self.steps:
            del batch["doc_ids"]
        return batch

    def state_dict(self) -> dict[str, int]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches.load_state_dict(state)


def pretraining_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
    """Each document attending to itself when the batch carries `doc_ids`, the whole window causally otherwise."""
    return packed_chat_loss(model, batch) if "doc_ids" in batch else causal_lm_loss(model, batch)


def _setup_data(cfg: Config, env: DistEnv, tokenizer: Tokenizer, seq_len: int):
    """Rank 0 tokenizes (or finds the cache); every process maps the same file and takes its own slice."""
    cache = Path(cfg.data.cache_dir or Path(cfg.out_dir) / "token_cache")
    files = [cfg.data.train_files] + ([cfg.data.val_files] if cfg.data.val_files else [])
    token_files = [build_token_file(f, tokenizer, cache) for f in files] if env.is_main else None
    token_file, *val_file = broadcast_object(env, token_files)
    if val_file:
        train_set, val_set = all_windows(token_file.open(), seq_len), all_windows(val_file[0].open(), seq_len)
    else:
        train_set, val_set = split_windows(token_file.open(), seq_len, cfg.data.val_fraction)
    t = cfg.train
    masked = cfg.data.document_mask_steps > 0
    collate = partial(collate_windows, bos_id=tokenizer.bos_id) if masked else collate_windows
    batches = ShuffledBatches(train_set, collate, t.micro_batch_size, t.global_batch_size,
                              env.rank, env.world_size, cfg.data.seed)
    if masked:
        batches = DocumentMaskedSteps(batches, cfg.data.document_mask_steps)
    val = None
    if len(val_set) >= t.micro_batch_size * env.world_size:
        val = partial(sequential_batches, val_set, collate, t.micro_batch_size, env.rank, env.world_size)
    return token_file, batches, val


def run(cfg: Config) -> TrainResult:
    """Pretrain as configured; resumes if `out_dir` already holds a checkpoint."""
    started = time.perf_counter()
    with distributed_run(cfg.train.device) as env:
        # 1. tokenizer and model shape
        tokenizer = Tokenizer(cfg.data.tokenizer)
        args = cfg.model.build_args(tokenizer.n_words)
        # 2. data: token stream, shuffled training windows, validation windows
        token_file, batches, val = _setup_data(cfg, env, tokenizer, args.max_seq_len)
        # 3. model, initialised identically on every process (FSDP then shards it)
        model = Transformer(args)
        model.init_weights(cfg.model.init_seed)
        resolved = replace(cfg, model=replace(cfg.model, max_seq_len=args.max_seq_len))
        trainer = Trainer(
            model, batches, pretraining_loss, cfg.train, cfg.out_dir, env,
            val_batches=val,
            export=hf_exporter(args, tokenizer.model_path),
            config_yaml=dump_config(resolved, header="resolved config; rerun with: llama2 pretrain --config THIS_FILE"),
            flops_per_token=args.flops_per_token(args.max_seq_len),
        )
        if env.is_main:
            print(f"pretrain: {args.num_params() / 1e6:.2f}M parameters, {token_file.n_tokens:,} tokens of data, "
                  f"{env.world_size} process(es) on {env.device}, {trainer.accum_steps} micro-batch(es) per "
                  f"update, precision {'bf16 autocast' if trainer.autocast_dtype else 'fp32'}", file=sys.stderr)
        # 4. the loop
        result = trainer.fit()
        if env.is_main:
            _summary(result, trainer, time.perf_counter() - started)
        return result


def _summary(result: TrainResult, trainer: Trainer, seconds: float) -> None:
    lines = [
        f"steps        {result.step} / {trainer.cfg.steps}{'  (interrupted)' if result.interrupted else ''}",
        f"tokens       {trainer.tokens_seen:,}",
        f"train loss   {result.final_loss:.4f}" if result.final_loss is not None else "train loss   -",
        f"val loss     {result.val_loss:.4f}" if result.val_loss is not None else "val loss     -",
        f"time         {seconds:.1f}s",
        f"checkpoint   {result.checkpoint}",
        f"metrics      {trainer.metrics_path}",
    ]
    print("\n".join(lines), file=sys.stderr)
