"""Supervised fine-tuning in the Llama 2 chat format (SPEC §5): the first Llama 2-Chat.

setup → loop → cleanup: read chat jsonl, encode every dialog with `encode_dialog_turns` (loss on assistant
tokens and their EOS only, except answers of `"weight": 0`), pack whole dialogs into `max_seq_len` windows
(block-diagonal attention by default, so a packed dialog sees only itself, as at inference), load the
starting checkpoint and hand everything to the shared engine. Ghost Attention (`gatt.py`) trains through
the same function, its rejected replies at weight 0.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial

from llama2.config import dump_config
from llama2.data.chat_packing import PackedChat, collate_chat, pack_dialogs
from llama2.data.formats import read_chat
from llama2.data.sampler import ShuffledBatches, sequential_batches
from llama2.generation.llama import find_tokenizer
from llama2.model.checkpoint import load_checkpoint
from llama2.stages.artifacts import model_dir
from llama2.stages.export import hf_exporter
from llama2.tokenizer.tokenizer import Tokenizer
from llama2.training.loop import TrainConfig, Trainer, TrainResult, fit_batches
from llama2.training.losses import packed_chat_loss
from llama2.training.parallel import distributed_run


@dataclass
class SFTData:
    """The dialogs to learn from."""

    train_files: list[str] = field(default_factory=list)
    """Chat jsonl files: `{"messages": [...]}` a line, each ending with an assistant turn."""
    val_files: list[str] = field(default_factory=list)
    """Chat jsonl held out for validation loss (optional)."""
    seed: int = 0
    """Seed of the dialog order before packing and of the window order."""
    block_diagonal: bool = True
    """Attention only within each packed dialog (True, our default: training matches inference) or across
    the whole window (False: llama-recipes' plain causal packing, a little faster on GPUs)."""


def _default_train() -> TrainConfig:
    # SPEC §5: cosine from 2e-5, weight decay 0.1, 64 sequences of 4096 tokens, 2 epochs.
    return TrainConfig(steps=1, global_batch_size=64, micro_batch_size=8, lr=2e-5, warmup_steps=0)


def finetune_train() -> TrainConfig:
    """Defaults for the small fine-tunes that go through this stage on generated data (GAtt, context
    distillation, the safety-scaling runs): SFT's rate on a smaller batch; `steps` is set from the epochs."""
    return TrainConfig(steps=1, global_batch_size=16, micro_batch_size=4, lr=2e-5, warmup_steps=0)


@dataclass
class Config:
    """`llama2 sft`: a starting checkpoint, chat data and the engine's settings."""

    out_dir: str = "runs/sft"
    """Run directory: checkpoints, metrics.jsonl, config.yaml. Re-running on it resumes."""
    init_from: str = ""
    """The model to fine-tune: a model directory (HF or Meta) or a run directory (its newest checkpoint)."""
    max_seq_len: int | None = None
    """Window length for packing (None: the model's context; Llama 2: 4096)."""
    epochs: float = 2.0
    """Passes over the packed windows; sets `train.steps` (SPEC §5: 2)."""
    data: SFTData = field(default_factory=SFTData)
    """The dialogs."""
    train: TrainConfig = field(default_factory=_default_train)
    """Optimizer, schedule, precision, parallelism, logging and checkpoints (`steps` is set from `epochs`)."""


def read_dialogs(files: list[str]) -> tuple[list[list[dict]], list[str]]:
    """All dialogs of `files`, with `file:line` of each for error reports."""
    dialogs, where = [], []
    for f in files:
        for record in read_chat(f, last_role="assistant"):
            dialogs.append(record.messages)
            where.append(f"{f}:{record.line}")
    return dialogs, where


def pack_files(files: list[str], tokenizer: Tokenizer, seq_len: int, data: SFTData) -> PackedChat:
    dialogs, where = read_dialogs(files)
    order = list(range(len(dialogs)))
    random.Random(data.seed).shuffle(order)
    packed = pack_dialogs(tokenizer, [dialogs[i] for i in order], seq_len)
    packed.report.untrainable = [order[i] for i in packed.report.untrainable]
    if packed.report.untrainable:
        lines = ", ".join(where[i] for i in sorted(packed.report.untrainable)[:5])
        print(f"sft: {len(packed.report.untrainable)} dialog(s) have no trained token and are left out: {lines}",
              file=sys.stderr)
    return packed


def run(cfg: Config) -> TrainResult:
    """Fine-tune as configured; resumes if `out_dir` already holds a checkpoint."""
    started = time.perf_counter()
    if not cfg.data.train_files:
        raise ValueError("sft: data.train_files is empty; give at least one chat jsonl file")
    with distributed_run(cfg.train.device) as env:
        # 1. the starting model and its tokenizer
        source = model_dir(cfg.init_from)
        tokenizer = Tokenizer(find_tokenizer(source))
        model = load_checkpoint(source, tokenizer.n_words)
        seq_len = cfg.max_seq_len or model.args.max_seq_len
        # 2. data: whole dialogs packed into windows, shuffled window order
        packed = pack_files(cfg.data.train_files, tokenizer, seq_len, cfg.data)
        if env.is_main:
            print(f"sft: {packed.report.summary()}", file=sys.stderr)
        train_cfg = fit_batches(cfg.train, len(packed), env.world_size, cfg.epochs)
        batches = ShuffledBatches(packed, collate_chat, train_cfg.micro_batch_size, train_cfg.global_batch_size,
                                  env.rank, env.world_size, cfg.data.seed)
        val = None
        if cfg.data.val_files:
            val_set = pack_files(cfg.data.val_files, tokenizer, seq_len, cfg.data)
            val = partial(sequential_batches, val_set, collate_chat, train_cfg.micro_batch_size, env.rank,
                          env.world_size)
        # 3. the loop
        resolved = replace(cfg, max_seq_len=seq_len, train=train_cfg)
        trainer = Trainer(
            model, batches, partial(packed_chat_loss, block_diagonal=cfg.data.block_diagonal), train_cfg,
            cfg.out_dir, env, val_batches=val, export=hf_exporter(model.args, tokenizer.model_path),
            config_yaml=dump_config(resolved, header="resolved config; rerun with: llama2 sft --config THIS_FILE"),
            flops_per_token=model.args.flops_per_token(seq_len),
        )
        result = trainer.fit()
        if env.is_main:
            print(f"sft: {result.step} steps ({cfg.epochs:g} epochs of {len(packed)} windows) in "
                  f"{time.perf_counter() - started:.1f}s; final loss {result.final_loss}; model in "
                  f"{result.checkpoint / 'model' if result.checkpoint else '-'}", file=sys.stderr)
        return result
