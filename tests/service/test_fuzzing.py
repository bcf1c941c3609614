"""Every route of the OpenAPI document, fuzzed by schemathesis against the real service: no 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.data


def test_no_route_answers_a_server_error_to_generated_requests(service, tmp_path):
    schemathesis = shutil.which("st", path=str(Path(sys.executable).parent))
    assert schemathesis, "schemathesis is part of the dev extra (scripts/setup.sh installs it)"
    logged_before = service.log_path.stat().st_size
    result = subprocess.run([schemathesis, "run", f"{service.url}/docs.json", "--checks", "not_a_server_error",
                             "--max-examples", "15", "--seed", "7", "--no-color"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache goes there
    assert result.returncode == 0, result.stdout[-6000:]
    assert "Selected: 18/18" in result.stdout  # every route of the document was exercised, /v1 and /models too
    with open(service.log_path, "rb") as log:
        log.seek(logged_before)
        assert b"Traceback" not in log.read()  # client mistakes are logged without server tracebacks
