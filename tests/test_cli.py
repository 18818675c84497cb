import argparse
import subprocess
import sys

from llama2.cli import build_parser


def _commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_every_command_answers_help():
    commands = _commands()
    assert {"generate", "chat", "tokenizer"} <= set(commands)
    for command in commands:
        proc = subprocess.run([sys.executable, "-m", "llama2.cli", command, "--help"], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0 and "usage:" in proc.stdout, command


def test_no_command_prints_help_and_fails():
    proc = subprocess.run([sys.executable, "-m", "llama2.cli"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "COMMAND" in proc.stdout
