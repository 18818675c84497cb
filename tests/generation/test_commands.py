import subprocess
import sys

import pytest

from llama2 import ModelArgs, Tokenizer, Transformer
from llama2.cli import main
from llama2.model.checkpoint import save_hf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer_path):
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=Tokenizer(tiny_tokenizer_path).n_words,
                     multiple_of=16, max_seq_len=64)
    model = Transformer(args)
    model.init_weights(seed=0)
    path = tmp_path_factory.mktemp("ckpt")
    save_hf(model, path, tokenizer_model=tiny_tokenizer_path)
    return path


def test_generate_prints_the_prompt_and_a_completion(checkpoint, capsys):
    assert main(["generate", "--model", str(checkpoint), "--prompt", "The river", "--temperature", "0",
                 "--max-gen-len", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The river") and len(out.strip()) > len("The river")


def test_missing_checkpoint_is_one_clear_line(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "directory not found" in err and "Traceback" not in err


def test_chat_session_over_stdin_exits_cleanly_on_eof(checkpoint):
    proc = subprocess.run(
        [sys.executable, "-m", "llama2.cli", "chat", "--model", str(checkpoint), "--system", "Be brief.",
         "--temperature", "0", "--max-gen-len", "4"],
        input="hello\n/reset\nagain\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2 and "(conversation cleared)" in proc.stdout


def test_a_run_folder_resolves_to_its_newest_checkpoint(checkpoint, tmp_path, capsys):
    import shutil

    step = tmp_path / "run" / "checkpoints" / "step_00000003"
    shutil.copytree(checkpoint, step / "model")
    (step / "trainer.json").write_text("{}")
    assert main(["generate", "--model", str(tmp_path / "run"), "--prompt", "The river", "--temperature", "0",
                 "--max-gen-len", "3"]) == 0
    assert capsys.readouterr().out.startswith("The river")
