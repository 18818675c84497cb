"""`llama2 data toyworld` and `llama2 data validate`: reproducible files that validate, clear errors."""

from __future__ import annotations

import argparse
import json

import pytest

from llama2 import cli
from llama2.data import commands
from llama2.data.formats import read_chat, read_preferences, read_text

CHAT = ("sft_train.jsonl", "sft_valid.jsonl", "eval_helpful.jsonl", "eval_adversarial.jsonl",
        "eval_borderline.jsonl")
PREFERENCE = tuple(f"pref_{k}_{s}.jsonl" for k in ("helpfulness", "safety") for s in ("train", "test"))
TEXT = ("pretrain.txt", "pretrain_valid.txt")


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="llama2")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "seed0"
    assert run("data", "toyworld", "--out", str(out), "--size", "small", "--tokenizer-vocab", "0") == 0
    return out


def test_registered_in_the_cli():
    assert "llama2.data.commands" in cli.COMMAND_MODULES


def test_writes_every_file_with_a_manifest(small):
    manifest = json.loads((small / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["size"] == "small" and manifest["version"] >= 1
    for name in (*CHAT, *PREFERENCE, *TEXT, "gatt_constraints.jsonl", "facts.jsonl"):
        assert (small / name).is_file() and name in manifest["files"]
    assert len(read_chat(small / "sft_train.jsonl", last_role="assistant")) == manifest["files"]["sft_train.jsonl"][
        "records"]
    assert all(r.meta["meta"]["kind"] == "adversarial" for r in read_chat(small / "eval_adversarial.jsonl", "user"))
    pairs = read_preferences(small / "pref_safety_train.jsonl")
    assert len(pairs) == manifest["files"]["pref_safety_train.jsonl"]["records"] and all(p.safety for p in pairs)
    assert len(read_text(small / "pretrain.txt")) == manifest["files"]["pretrain.txt"]["documents"]


def test_same_seed_is_byte_identical_other_seed_differs(small, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    assert run("data", "toyworld", "--out", str(again), "--size", "small", "--tokenizer-vocab", "0") == 0
    assert run("data", "toyworld", "--out", str(other), "--size", "small", "--seed", "1",
               "--tokenizer-vocab", "0") == 0
    for path in small.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
        if path.name != "gatt_constraints.jsonl":  # hobbies and formats are the same; figures differ
            assert (other / path.name).read_bytes() != path.read_bytes(), path.name


def test_validate_every_written_file(small, capsys):
    for kind, names in (("chat", CHAT), ("preference", PREFERENCE), ("text", TEXT)):
        for name in names:
            assert run("data", "validate", str(small / name), "--kind", kind) == 0
            out = capsys.readouterr().out
            assert "valid" in out and "min" in out and "mean" in out


def test_validate_reports_errors_with_line_and_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "assistant"}]}\n')
    assert run("data", "validate", str(bad), "--kind", "chat") == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: messages[0].content: got NoneType (expected a string)" in err and "1 error(s)" in err


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit):
        run("data", "toyworld", "--help")
    out = capsys.readouterr().out
    for option in ("--out", "--seed", "--size", "--tokenizer-vocab"):
        assert option in out


def test_trains_the_toy_tokenizer(tmp_path):
    out = tmp_path / "tok"
    assert run("data", "toyworld", "--out", str(out), "--size", "small", "--tokenizer-vocab", "400") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 400 and manifest["tokenizer"]["pretrain_tokens"] > 50_000
    assert (out / "tokenizer" / "tokenizer.model").is_file()
