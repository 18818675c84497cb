"""Readers and validators: good records read into typed records, every bad record gives one clear error."""

from __future__ import annotations

import gzip
import json
import random
import re

import pytest

from llama2.data.formats import (
    ChatRecord,
    FormatError,
    PreferenceRecord,
    read_chat,
    read_preferences,
    read_text,
    validate_file,
)

HH_COUNTS = {"harmless-base": 2312, "helpful-base": 2354, "helpful-online": 1137, "helpful-rejection-sampled": 2749}
GOOD_PAIR = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": "Hello.", "rejected": "Go away.",
             "rating": "better", "safety": {"chosen_safe": True, "rejected_safe": False}}


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_chat_reader_returns_typed_records(tmp_path):
    path = _write(tmp_path / "c.jsonl", [
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello."}], "id": "a"}),
        json.dumps({"messages": [{"role": "user", "content": "Q?"}]}),
    ])
    records = read_chat(path)
    assert [type(r) for r in records] == [ChatRecord, ChatRecord]
    assert records[0].meta == {"id": "a"} and records[0].line == 1
    assert records[1].messages == [{"role": "user", "content": "Q?"}]
    with pytest.raises(FormatError, match=r"c\.jsonl:2: messages\[0\]\.role: .*expected the list to end with"):
        read_chat(path, last_role="assistant")


def test_an_assistant_message_of_weight_0_is_kept_and_a_bad_weight_is_named(tmp_path):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.", "weight": 0}]
    path = _write(tmp_path / "w.jsonl", [json.dumps({"messages": turns})])
    assert read_chat(path)[0].messages == turns
    for bad in ([{**turns[0], "weight": 1}, turns[1]], [turns[0], {**turns[1], "weight": 0.5}],
                [turns[0], {**turns[1], "weight": True}]):
        path = _write(tmp_path / "w.jsonl", [json.dumps({"messages": turns}), json.dumps({"messages": bad})])
        with pytest.raises(FormatError, match=r"w\.jsonl:2: messages\[[01]\]\.weight: .*expected 0 or 1"):
            read_chat(path)


def test_preference_reader_native_and_hh(tmp_path):
    path = _write(tmp_path / "p.jsonl", [json.dumps(GOOD_PAIR)])
    (rec,) = read_preferences(path)
    assert isinstance(rec, PreferenceRecord) and rec.rating == "better" and rec.safety["rejected_safe"] is False
    assert rec.to_dict() == GOOD_PAIR

    hh = [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Bad."},
        {"chosen": "\n\nHuman: Why?\n\nAssistant:", "rejected": "\n\nHuman: Why?\n\nAssistant: Because."},
        {"chosen": "\n\nHuman: Same\n\nAssistant: X", "rejected": "\n\nHuman: Same\n\nAssistant: X"},
    ]
    gz = tmp_path / "hh.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in hh)
    multi, empty, same = read_preferences(gz)
    assert [m["role"] for m in multi.prompt] == ["user", "assistant", "user"]
    assert (multi.chosen, multi.rejected, multi.rating) == ("Fine.", "Bad.", None)
    assert empty.chosen == "" and "empty_chosen" in empty.notes
    assert "identical" in same.notes


def test_text_reader_txt_and_jsonl(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("doc one line one\nline two\n\n\ndoc two\n", encoding="utf-8")
    assert [r.text for r in read_text(txt)] == ["doc one line one\nline two", "doc two"]
    jl = _write(tmp_path / "c.jsonl", [json.dumps({"text": "a"}), json.dumps({"text": "b c"})])
    assert [r.text for r in read_text(jl)] == ["a", "b c"]


def test_real_anthropic_hh_files_read_cleanly(shared_data):
    root = shared_data / "hh-rlhf"
    if not root.is_dir():
        pytest.skip(f"Anthropic HH data not found at {root}")
    for split, count in HH_COUNTS.items():
        records = read_preferences(root / split / "test.jsonl.gz")
        assert len(records) == count, split
        for r in records:
            assert r.prompt[0]["role"] == "user" and r.prompt[-1]["role"] == "user"
            roles = [m["role"] for m in r.prompt]
            assert all(a != b for a, b in zip(roles, roles[1:], strict=False)), (split, r.line)
        report = validate_file(root / split / "test.jsonl.gz", "preference")
        assert report.ok and report.records == count and report.counts["unrated"] == count


# ------------------------------------------------------------------------------------------------- fuzz

def _malformed(rng: random.Random) -> list[tuple[bytes, str]]:
    """(line bytes, kind) pairs, each malformed in exactly one way."""
    good_chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    cases: list[tuple[object, str]] = [
        ("{not json", "chat"), ("[1, 2]", "chat"), ('"a string"', "chat"), ("{}", "chat"),
        ({"messages": "hi"}, "chat"), ({"messages": []}, "chat"), ({"messages": [1]}, "chat"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "chat"),
        ({"messages": [{"role": "user", "content": 3}]}, "chat"),
        ({"messages": [{"role": "user", "content": "  "}]}, "chat"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "chat"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "chat"),
        ({"messages": [{"role": "system", "content": "s"}]}, "chat"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "chat"),
        ({"text": 5}, "text"), ({"text": ""}, "text"), ({"txt": "a"}, "text"), ("nope", "text"),
    ]
    for key in ("prompt", "chosen", "rejected", "rating"):
        bad = dict(GOOD_PAIR)
        del bad[key]
        cases.append((bad, "preference"))
    for key, value in (("prompt", "Hi"), ("prompt", [{"role": "assistant", "content": "x"}]), ("chosen", 1),
                       ("rejected", None), ("chosen", " "), ("rating", "best"), ("rating", 3), ("safety", []),
                       ("safety", {"chosen_safe": "yes", "rejected_safe": True}), ("safety", {"chosen_safe": True}),
                       ("safety", {"chosen_safe": False, "rejected_safe": True})):
        cases.append(({**GOOD_PAIR, key: value}, "preference"))
    cases.append(({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: x"}, "preference"))
    cases.append(({"chosen": "\n\nAssistant: x\n\nHuman: hi\n\nAssistant: y",
                   "rejected": "\n\nHuman: hi\n\nAssistant: x"}, "preference"))
    out: list[tuple[bytes, str]] = []
    for value, kind in cases:
        out.append(((value if isinstance(value, str) else json.dumps(value)).encode(), kind))
    # random damage to good lines: truncation, invalid UTF-8, a deleted key, a very long line
    for i in range(200):
        kind = ("chat", "preference", "text")[i % 3]
        good = {"chat": good_chat, "preference": GOOD_PAIR, "text": {"text": "some text"}}[kind]
        raw = json.dumps(good).encode()
        damage = i % 4
        if damage == 0:
            raw = raw[: rng.randrange(1, len(raw) - 1)]
        elif damage == 1:
            pos = rng.randrange(len(raw))
            raw = raw[:pos] + bytes([rng.choice((0x80, 0xC3, 0xFF))]) + raw[pos + 1:]
        elif damage == 2:
            broken = json.loads(raw)
            del broken[rng.choice(sorted(k for k in broken if k != "safety"))]  # safety is optional
            raw = json.dumps(broken).encode()
        else:
            raw = b'{"text": "' + b"x" * 1_100_000 + b'"}'
        out.append((raw, kind))
    return out


def test_fuzz_every_malformed_record_gives_one_clear_error(tmp_path):
    rng = random.Random(0)
    cases = _malformed(rng)
    assert len(cases) >= 200
    for i, (raw, kind) in enumerate(cases):
        path = tmp_path / f"case{i}.jsonl"
        path.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n" + raw + b"\n")
        if kind != "text":  # line 1 must be valid for its kind, so the error is on line 2
            first = {"chat": {"messages": [{"role": "user", "content": "ok"}]}, "preference": GOOD_PAIR}[kind]
            path.write_bytes(json.dumps(first).encode() + b"\n" + raw + b"\n")
        report = validate_file(path, kind)
        assert len(report.errors) == 1, (raw[:200], kind, report.errors)
        err = report.errors[0]
        assert err.line == 2 and str(err).startswith(f"{path}:2: "), str(err)
        assert "expected" in str(err), str(err)
        reader = {"chat": read_chat, "preference": read_preferences, "text": read_text}[kind]
        with pytest.raises(FormatError, match=re.escape(f"{path}:2: ")):
            reader(path)


def test_validate_collects_errors_and_reads_on(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "a"}\n\xff\xfe\n{"text": 1}\n{"text": "b"}\n')
    report = validate_file(path, "text")
    assert [e.line for e in report.errors] == [2, 3] and report.records == 2 and not report.ok
