"""Finding a stage's output: the model directory inside a run directory's newest checkpoint."""

from __future__ import annotations

from pathlib import Path

from llama2.training.checkpointing import latest_checkpoint

INSTRUCTION_PHASE = "instructions"
"""The folder of the pipeline SFT stage's second phase (instruction-following dialogs), inside the stage's."""


def model_dir(path: str | Path) -> Path:
    """`path` itself if it is a model directory (HF or Meta), else its newest checkpoint's `model/`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model or run directory not found: {path}")
    if (path / "config.json").is_file() or (path / "params.json").is_file():
        return path
    latest = latest_checkpoint(path / "checkpoints")
    if latest is None or not (latest / "model" / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: neither a model directory (config.json / params.json) nor a run directory with a "
            "complete checkpoint (checkpoints/step_*/model)"
        )
    return latest / "model"
