"""The READMEs' snippets run as written: every fenced ``python`` block against the real service (its
address put in place of the documented one), the ``yaml`` settings example through the settings
loader, and the ``bash`` install line of the SDK into a folder of its own. (The indented command
synopses, ``cnnkit train RECIPE ...``, are checked by the command line's own tests.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.data

ROOT = Path(__file__).resolve().parents[2]
READMES = [ROOT / "README.md", ROOT / "clients" / "README.md"]


def blocks(language: str) -> list[tuple[str, str]]:
    found = []
    for readme in READMES:
        for index, block in enumerate(re.findall(rf"^```{language}\n(.*?)^```$", readme.read_text(), re.S | re.M)):
            found.append((f"{readme.relative_to(ROOT)}#{language}{index}", block))
    return found


@pytest.fixture(scope="module")
def images(data_root, tmp_path_factory):
    """The files the snippets name (seven.png, a.png, b.jpg): real test digits."""
    from PIL import Image

    from cnnkit.training.data import load_dataset

    folder = tmp_path_factory.mktemp("snippets")
    digits = load_dataset("mnist", data_root, validation_size=10, test_limit=30)
    seven = next(image for image, label in zip(digits.x_test, digits.y_test, strict=True) if label == 7)
    Image.fromarray(seven[..., 0]).save(folder / "seven.png")
    Image.fromarray(digits.x_test[0][..., 0]).save(folder / "a.png")
    Image.fromarray(digits.x_test[1][..., 0]).convert("RGB").save(folder / "b.jpg")
    return folder


def test_there_are_snippets_to_run():
    assert len(blocks("python")) == 2 and len(blocks("yaml")) == 1 and len(blocks("bash")) == 1


@pytest.mark.parametrize(("where", "code"), blocks("python"), ids=[where for where, _ in blocks("python")])
def test_python_snippets_run_against_the_service(where, code, service, images, monkeypatch):
    code = code.replace("http://127.0.0.1:3000", service.url).replace("127.0.0.1:8500", service.grpc_target)
    monkeypatch.chdir(images)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the README's own example
    assert "client" in namespace


@pytest.mark.parametrize(("where", "text"), blocks("yaml"), ids=[where for where, _ in blocks("yaml")])
def test_the_settings_example_loads(where, text, tmp_path, monkeypatch):
    from cnnkit.settings import load_settings

    for name in [name for name in os.environ if name.startswith("CNNKIT_")]:
        monkeypatch.delenv(name)
    (tmp_path / "serve.yaml").write_text(text)
    settings = load_settings(tmp_path / "serve.yaml")
    assert settings.http_port == 3001 and settings.ort_providers == ["CPUExecutionProvider"]


def test_the_sdk_installs_alone_as_the_readme_says(tmp_path):
    (where, command), = blocks("bash")
    line = command.split("#")[0].strip()
    assert line == "pip install ./clients", where
    # The same install, into a folder of its own rather than the test environment.
    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                                str(target), str(ROOT / "clients")], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    probe = subprocess.run([sys.executable, "-c", "import sys, cnnkit_client; print(cnnkit_client.__file__); "
                            "print('tensorflow' in sys.modules)"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(target)}, cwd=tmp_path)
    assert probe.stdout.split() == [str(target / "cnnkit_client" / "__init__.py"), "False"], probe.stderr
