"""Pretraining data: documents joined with BOS/EOS into a cached token file, windows, and the sampler."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from llama2.data.packing import all_windows, build_token_file, collate_windows, read_documents, split_windows
from llama2.data.sampler import ShuffledBatches, sequential_batches
from llama2.tokenizer.tokenizer import Tokenizer


def test_documents_from_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("one\nstill one\n\n\ntwo\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": "three"}) + "\n\n" + json.dumps({"text": "four"}) + "\n")
    assert list(read_documents(txt)) == ["one\nstill one", "two"]
    assert list(read_documents(jsonl)) == ["three", "four"]
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="c.jsonl:1: expected a JSON object with a 'text' field"):
        list(read_documents(bad))
    with pytest.raises(ValueError, match="must be .txt or .jsonl"):
        list(read_documents(tmp_path / "d.csv"))


def test_token_file_joins_documents_and_is_cached_until_inputs_change(tmp_path, pretrain_data):
    _, tok_path = pretrain_data
    tok = Tokenizer(tok_path)
    corpus = tmp_path / "c.txt"
    corpus.write_text("Ada went home.\n\nBo sang.\n")
    first = build_token_file([corpus], tok, tmp_path / "cache")
    ids = first.open().tolist()
    assert ids == tok.encode("Ada went home.", True, True) + tok.encode("Bo sang.", True, True)
    assert first.open().dtype == np.uint16
    mtime = os.stat(first.path).st_mtime_ns
    again = build_token_file([corpus], tok, tmp_path / "cache")
    assert again.path == first.path and os.stat(again.path).st_mtime_ns == mtime  # reused, not rebuilt
    corpus.write_text("Ada went home.\n\nBo sang twice.\n")
    changed = build_token_file([corpus], tok, tmp_path / "cache")
    assert changed.path != first.path and changed.n_tokens > first.n_tokens
    with pytest.raises(FileNotFoundError, match="pretraining data file not found"):
        build_token_file([tmp_path / "missing.txt"], tok, tmp_path / "cache")


def test_windows_overlap_by_one_token_and_labels_are_shifted():
    stream = np.arange(41)
    train, val = split_windows(stream, seq_len=8, val_fraction=0.2)
    assert (len(train), len(val)) == (4, 1)
    assert train[1].tolist() == list(range(8, 17)) and val[0].tolist() == list(range(32, 41))
    batch = collate_windows([train[0], train[1]])
    assert batch["tokens"].shape == (2, 8) and batch["tokens"][1, 0] == 8
    assert batch["labels"][1].tolist() == list(range(9, 17))
    with pytest.raises(ValueError, match="too short"):
        split_windows(np.arange(9), seq_len=8, val_fraction=0.5)
    assert len(all_windows(stream, seq_len=8)) == 5
    with pytest.raises(ValueError, match="shorter than one window"):
        all_windows(np.arange(8), seq_len=8)


def _ids(rows: list[int]) -> list[int]:
    """The identity collate: a micro-batch is the list of example ids, to compare orders."""
    return rows


def test_sampler_order_does_not_depend_on_the_number_of_processes():
    data = list(range(50))
    single = ShuffledBatches(data, _ids, 4, 8, seed=3)
    ranks = [ShuffledBatches(data, _ids, 2, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(20):  # 20 global batches: several epochs of 6 whole batches each
        one = next(single) + next(single)
        two = []
        for _ in range(2):  # two rounds of (rank 0, rank 1) micro-batches
            two += next(ranks[0]) + next(ranks[1])
        assert sorted(one) == sorted(two)
    assert single.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()
    assert single.state_dict()["epoch"] == 3  # 48 of the 50 examples per epoch


def test_sampler_resumes_exactly_and_rejects_a_mid_batch_cursor():
    data = list(range(30))
    a = ShuffledBatches(data, _ids, 4, 8, seed=0)
    for _ in range(6):
        next(a)
    b = ShuffledBatches(data, _ids, 4, 8, seed=99)
    b.load_state_dict(a.state_dict())
    assert [next(a) for _ in range(10)] == [next(b) for _ in range(10)]
    with pytest.raises(ValueError, match="not at a global batch boundary"):
        b.load_state_dict({"seed": 0, "epoch": 0, "cursor": 4})
    with pytest.raises(ValueError, match="not a multiple"):
        ShuffledBatches(data, _ids, 3, 8)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShuffledBatches(data[:5], _ids, 4, 8)


def test_length_grouped_sampler_visits_every_example_once_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=256).tolist()
    data = list(range(256))

    def padded(sampler, batches):  # padded tokens of `batches` micro-batches: max length × rows
        return sum(max(lengths[i] for i in b) * len(b) for b in (next(sampler) for _ in range(batches)))

    grouped = ShuffledBatches(data, _ids, 8, 16, seed=1, lengths=lengths, length_group=4)
    epoch = [i for _ in range(32) for i in next(grouped)]
    assert sorted(epoch) == data  # one epoch = 32 micro-batches, each example once
    plain = ShuffledBatches(data, _ids, 8, 16, seed=1)
    grouped = ShuffledBatches(data, _ids, 8, 16, seed=1, lengths=lengths, length_group=4)
    assert padded(grouped, 32) < 0.75 * padded(plain, 32)
    # the order is a function of (seed, epoch, cursor) only, so a resume continues exactly
    a = ShuffledBatches(data, _ids, 8, 16, seed=1, lengths=lengths)
    for _ in range(6):
        next(a)
    b = ShuffledBatches(data, _ids, 8, 16, seed=5, lengths=lengths)
    b.load_state_dict(a.state_dict())
    assert [next(a) for _ in range(40)] == [next(b) for _ in range(40)]
    with pytest.raises(ValueError, match="lengths for"):
        ShuffledBatches(data, _ids, 8, 16, lengths=lengths[:-1])


def test_validation_batches_are_equal_in_number_on_every_process():
    data = list(range(11))
    per_rank = [list(sequential_batches(data, _ids, 2, r, 2)) for r in range(2)]
    assert [len(b) for b in per_rank] == [2, 2]
    assert sorted(sum(per_rank[0] + per_rank[1], [])) == list(range(8))
