"""Full-data checks against the course's figures (``-m slow``; minutes each on 2 CPU cores)."""

from __future__ import annotations

import json

import pytest

from cnnkit.training.config import load_recipe
from cnnkit.training.train import train

pytestmark = [pytest.mark.slow, pytest.mark.data]


@pytest.mark.parametrize("recipe_name", ["mnist_convnet", "mnist_lenet5"])
def test_digits_recipes_reach_the_course_accuracy(recipe_name, tmp_path, data_root):
    run_dir = train(load_recipe(recipe_name), run_dir=tmp_path / recipe_name, data_dir=data_root,
                    verbose=0)
    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    assert metrics["test_images"] == 10000
    assert metrics["test_accuracy"] >= 0.993
