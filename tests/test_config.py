"""Config loading: nested dataclasses from YAML, typed overrides, and clear errors naming key and file."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from llama2 import cli
from llama2.config import ConfigError, dump_config, load_config
from llama2.stages import pretrain

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"


@dataclass
class Inner:
    lr: float = 1e-3
    """learning rate"""
    steps: int = 10
    """steps"""
    mode: Literal["a", "b"] = "a"
    """mode"""


@dataclass
class Outer:
    name: str = "x"
    """name"""
    files: list[str] = field(default_factory=list)
    """files"""
    limit: int | None = None
    """optional limit"""
    inner: Inner = field(default_factory=Inner)
    """nested section"""


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_typed_nested_config(tmp_path):
    path = write(tmp_path, "name: run\ninner:\n  lr: 3e-4\n  steps: 5\n")
    cfg = load_config(Outer, path, ["inner.steps=7", "files=[a.txt, b.txt]", "limit=null", "inner.mode=b"])
    assert cfg == Outer(name="run", files=["a.txt", "b.txt"], limit=None, inner=Inner(lr=3e-4, steps=7, mode="b"))
    assert isinstance(cfg.inner.lr, float)  # YAML reads 3e-4 as a string; it is converted, not rejected


@dataclass
class WithFactorySection:
    fast: Inner = field(default_factory=lambda: Inner(lr=0.5, mode="b"))
    """a section whose default differs from Inner's own"""


def test_a_section_in_a_file_overrides_only_the_keys_it_names(tmp_path):
    # the rest keep the field's default (its factory's values), not the section class's defaults
    cfg = load_config(WithFactorySection, write(tmp_path, "fast:\n  steps: 3\n"))
    assert cfg.fast == Inner(lr=0.5, steps=3, mode="b")
    assert load_config(WithFactorySection, None, ["fast.lr=0.1"]).fast == Inner(lr=0.1, steps=10, mode="b")
    assert load_config(WithFactorySection).fast == Inner(lr=0.5, mode="b")


def test_resolved_config_round_trips(tmp_path):
    cfg = Outer(name="r", files=["a"], limit=3, inner=Inner(lr=0.5, steps=2, mode="b"))
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg, header="a header"))
    assert path.read_text().startswith("# a header\n")
    assert load_config(Outer, path) == cfg


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("inner:\n  lrr: 1\n", [], "unknown key inner.lrr"),
        ("nmae: x\n", [], "unknown key nmae"),
        ("inner:\n  steps: ten\n", [], "inner.steps must be int, got 'ten'"),
        ("inner:\n  steps: 1.5\n", [], "inner.steps must be int"),
        ("", ["inner.steps=true"], "inner.steps must be int, got True"),
        ("", ["inner.mode=c"], "inner.mode must be one of 'a', 'b'"),
        ("", ["files=3"], "files must be a list"),
        ("", ["inner.nope=1"], "unknown key inner.nope"),
        ("", ["inner"], "expected KEY=VALUE"),
        ("name: x\n", ["name.sub=1"], "name is a value, not a section"),
        ("", ["name.sub=1"], "name must be str, got {'sub': 1}"),
        ("- 1\n- 2\n", [], "expected a mapping"),
        ("a: [\n", [], "not valid YAML"),
    ],
)
def test_errors_name_the_key_and_file(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path, overrides)
    assert message in str(err.value)
    if not overrides:
        assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(Outer, tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "{tmp}/missing.yaml"], "config file not found"),
        (["--config", "{tmp}/c.yaml", "--set", "train.stepz=3"], "unknown key train.stepz"),
        (["--config", "{tmp}/c.yaml", "--set", "train.steps=many"], "train.steps must be int"),
        (["--config", "{tmp}/c.yaml", "--set", "train.steps=0"], "steps must be positive"),
    ],
)
def test_cli_config_errors_are_one_line(tmp_path, capsys, args, message):
    write(tmp_path, "out_dir: x\n")
    code = cli.main(["pretrain", *[a.format(tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err
    assert "Traceback" not in err
    assert err.startswith("llama2 pretrain: error:")


def test_cli_subprocess_exit_code_and_stderr(tmp_path):
    path = write(tmp_path, "model:\n  preset: toy-smoke\n  heads: 4\n")
    proc = subprocess.run([sys.executable, "-m", "llama2.cli", "pretrain", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"{path}: unknown key model.heads" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["smoke", "demo", "7b", "13b", "70b"])
def test_presets_load_and_show_their_launch_command(name):
    path = PRESETS / f"{name}.yaml"
    assert "pretrain --config configs/pretrain/" + name in path.read_text().splitlines()[0]
    cfg = load_config(pretrain.Config, path)
    assert cfg.model.build_args(vocab_size=1024).num_params() > 0


@pytest.mark.parametrize(("name", "lr"), [("7b", 3e-4), ("13b", 3e-4), ("70b", 1.5e-4)])
def test_paper_hyperparameters_in_large_presets(name, lr):
    cfg = load_config(pretrain.Config, PRESETS / f"{name}.yaml")
    t = cfg.train
    assert (t.lr, t.beta1, t.beta2, t.eps, t.weight_decay, t.grad_clip) == (lr, 0.9, 0.95, 1e-5, 0.1, 1.0)
    assert (t.warmup_steps, t.min_lr_ratio) == (2000, 0.1)
    args = cfg.model.build_args(32000)
    assert t.global_batch_size * args.max_seq_len == 4 * 2**20  # 4M-token batches of 4096
