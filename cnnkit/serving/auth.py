"""The optional API key, checked the same way by both front ends.

HTTP clients send it as ``x-api-key: KEY`` or ``Authorization: Bearer KEY``; gRPC clients as the
same metadata. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable


def presented_key(headers: Iterable[tuple[str, str]]) -> str:
    """The key a request carries (``x-api-key`` wins over a Bearer token), or ''."""
    bearer = ""
    for name, value in headers:
        lowered = name.lower()
        if lowered == "x-api-key":
            return value
        if lowered == "authorization" and value.lower().startswith("bearer "):
            bearer = value[7:].strip()
    return bearer


def key_matches(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode(), expected.encode())
