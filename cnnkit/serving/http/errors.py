"""The one way the HTTP front end answers a refused request: ``{"error": message}`` with the status."""

from __future__ import annotations

from starlette.responses import JSONResponse

from cnnkit.errors import ServingError


def error_response(error: ServingError) -> JSONResponse:
    retry_after = getattr(error, "retry_after", None)
    headers = {"retry-after": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": error.message}, status_code=error.http_status, headers=headers)
