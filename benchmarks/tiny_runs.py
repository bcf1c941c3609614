"""A real but quickly trained run for benchmarks whose speed does not depend on the weights."""

from __future__ import annotations

from pathlib import Path


def train_tiny_run(recipe_name: str, workdir: Path, data_dir: str | None) -> Path:
    """``recipe_name`` trained for one epoch on 64 images into ``workdir/run`` (its run directory)."""
    from cnnkit.training.config import apply_overrides, load_recipe
    from cnnkit.training.train import train

    recipe = apply_overrides(load_recipe(recipe_name),
                             ["epochs=1", "train_limit=64", "test_limit=64", "validation_size=32"])
    return Path(train(recipe, run_dir=workdir / "run", data_dir=data_dir, verbose=0))
