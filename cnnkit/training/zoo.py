"""The model zoo as a listing, without building anything.

``cnnkit models`` shows the zoo in well under a second: the builders live in
:mod:`cnnkit.training.models`, which imports Keras and so TensorFlow (seconds). This module reads
that file's source instead and lists the functions decorated with ``@register_model``, with the
first line of their docstrings. A test checks that it names exactly what
``cnnkit.training.models.list_models()`` returns.
"""

from __future__ import annotations

import ast
from pathlib import Path

MODELS_SOURCE = Path(__file__).with_name("models.py")


def describe_zoo() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered model builder, sorted by name."""
    found = []
    for node in ast.parse(MODELS_SOURCE.read_text()).body:
        registered = any(isinstance(decorator, ast.Name) and decorator.id == "register_model"
                         for decorator in getattr(node, "decorator_list", []))
        if isinstance(node, ast.FunctionDef) and registered:
            found.append((node.name, (ast.get_docstring(node) or "").split("\n")[0]))
    return sorted(found)
