"""A real cnnkit service on 127.0.0.1 for tests (see cnnkit.serving.process)."""

from __future__ import annotations

from pathlib import Path

from cnnkit.serving.process import ServiceProcess, free_port


class RunningService(ServiceProcess):
    """Started at once, polling the repository every 0.5 s, its log beside the repository."""

    def __init__(self, repository: Path, api_key: str | None = None, environment: dict[str, str] | None = None):
        super().__init__(repository, repository.parent, api_key=api_key,
                         environment={"CNNKIT_POLL_SECONDS": "0.5", "CNNKIT_DRAIN_SECONDS": "0",
                                      "CNNKIT_CACHE_DIR": str(repository.parent / "cache"), **(environment or {})})
        self.start()


__all__ = ["RunningService", "free_port"]
