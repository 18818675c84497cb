"""Training stages of the recipe: each module has a `Config` dataclass and `run(cfg)` (see `commands.py`)."""
