"""Settings: one typed object from flags, environment, a YAML file and defaults; the README lists them all."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest

from cnnkit.errors import ConfigError
from cnnkit.settings import Settings, load_settings, service_settings, write_settings_file

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in [name for name in __import__("os").environ if name.startswith("CNNKIT_")]:
        monkeypatch.delenv(name)


def test_defaults():
    settings = load_settings()
    assert (settings.host, settings.http_port, settings.grpc_port) == ("127.0.0.1", 3000, 8500)
    assert settings.model_repository == Path("model_repository") and settings.api_key is None
    assert settings.ort_providers == [] and settings.explain_queue == 8


def test_flags_win_over_the_environment_which_wins_over_the_file(monkeypatch, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("http_port: 4000\ngrpc_port: 9000\nhost: 0.0.0.0\nort_providers: [CPUExecutionProvider]\n")
    monkeypatch.setenv("CNNKIT_GRPC_PORT", "9100")
    monkeypatch.setenv("CNNKIT_BENTO_MODELS", "digits:1, cifar10:latest")
    settings = load_settings(config, http_port=None, host="127.0.0.2")
    assert settings.http_port == 4000  # the file (no flag, no variable)
    assert settings.grpc_port == 9100  # the variable over the file
    assert settings.host == "127.0.0.2"  # the flag over the file
    assert settings.ort_providers == ["CPUExecutionProvider"]
    assert settings.bento_models == ["digits:1", "cifar10:latest"]  # comma-separated in the environment
    monkeypatch.setenv("CNNKIT_CONFIG", str(config))
    assert load_settings().http_port == 4000


@pytest.mark.parametrize(("where", "message"), [
    ("flag", "http_port (CNNKIT_HTTP_PORT): Input should be a valid integer"),
    ("environment", "http_port (CNNKIT_HTTP_PORT): Input should be less than or equal to 65535"),
    ("file", "htp_port (CNNKIT_HTP_PORT): is not a setting"),
])
def test_a_bad_setting_is_named(where, message, monkeypatch, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("htp_port: 3001\n" if where == "file" else "{}\n")
    if where == "environment":
        monkeypatch.setenv("CNNKIT_HTTP_PORT", "70000")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(config, http_port="x" if where == "flag" else None)


def test_an_unreadable_or_malformed_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="Cannot read the settings file"):
        load_settings(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_settings(tmp_path / "list.yaml")


def test_the_service_reads_the_file_cnnkit_serve_resolved(monkeypatch, tmp_path):
    resolved = load_settings(api_key="secret", http_port=3999)
    path = write_settings_file(resolved, tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the API key
    assert json.loads(path.read_text())["http_port"] == 3999
    monkeypatch.setenv("CNNKIT_SETTINGS_FILE", str(path))
    monkeypatch.setenv("CNNKIT_HTTP_PORT", "1234")  # resolved already: the file wins
    assert service_settings() == resolved
    monkeypatch.setenv("CNNKIT_SETTINGS_FILE", str(tmp_path / "gone.json"))
    with pytest.raises(ConfigError, match="CNNKIT_SETTINGS_FILE"):
        service_settings()


def test_the_readme_lists_every_setting_with_its_default():
    text = README.read_text()
    for variable, default, _description in Settings.table():
        row = re.search(rf"^\| `{variable}` \| ([^|]*) \|", text, re.MULTILINE)
        assert row, f"README.md has no row for {variable}"
        assert row.group(1).strip().strip("`") == default, variable
