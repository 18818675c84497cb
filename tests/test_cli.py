import argparse
import os
import subprocess
import sys

import pytest

from llama2.cli import build_parser, main


def _commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_every_command_answers_help(capsys):
    # in this process: a subprocess a command took 5 s on a 2-core AVX2 EPYC (importing torch), 116 s in all;
    # the next test runs the module as a program
    commands = _commands()
    assert {"generate", "chat", "tokenizer"} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0 and f"usage: llama2 {command}" in capsys.readouterr().out, command


def test_no_command_prints_help_and_fails():
    proc = subprocess.run([sys.executable, "-m", "llama2.cli"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "COMMAND" in proc.stdout


def test_a_torchrun_worker_exits_with_the_commands_status_without_finalization(tmp_path):
    script = ("import atexit; atexit.register(lambda: print('finalized')); from llama2.cli import main; "
              f"main(['pretrain', '--config', '{tmp_path / 'missing.yaml'}'])")
    alone = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert alone.returncode == 0 and "finalized" in alone.stdout  # main returns; the interpreter finalizes
    env = {**os.environ, "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "test"}
    worker = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert worker.returncode == 1 and "missing.yaml" in worker.stderr
    assert "finalized" not in worker.stdout
