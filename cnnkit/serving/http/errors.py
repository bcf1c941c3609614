"""The one way the HTTP front end answers a refused request: ``{"error": message}`` with the status."""

from __future__ import annotations

from starlette.responses import JSONResponse

from cnnkit.errors import ServingError


def error_response(error: ServingError) -> JSONResponse:
    return JSONResponse({"error": error.message}, status_code=error.http_status)
