"""One real service on 127.0.0.1 for the whole session, shared by the HTTP, gRPC and SDK tests.

Tests that change the repository or need other settings (an API key) start their own.
"""

from __future__ import annotations

import shutil

import pytest
from services import RunningService


@pytest.fixture(scope="session")
def repository(digits_repository, tmp_path_factory):
    """A copy of the tiny digits repository that the shared service serves (left unchanged)."""
    copy = tmp_path_factory.mktemp("service") / "model_repository"
    shutil.copytree(digits_repository, copy)
    return copy


@pytest.fixture(scope="session")
def service(repository):
    running = RunningService(repository)
    yield running
    running.stop()
