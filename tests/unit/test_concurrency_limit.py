"""The HTTP concurrency cap: requests past it are answered 429 at once, and every slot comes back."""

from __future__ import annotations

import asyncio
import json

import pytest

from cnnkit.serving.http.middleware import ConcurrencyLimitMiddleware


class HeldApp:
    """An ASGI app whose requests stay in progress until released (or fail, when told to)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def __call__(self, scope, receive, send) -> None:
        self.started += 1
        await self.release.wait()
        if scope["path"] == "/fails":
            raise RuntimeError("the model broke")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def _call(middleware, path: str = "/predict") -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await middleware({"type": "http", "path": path, "method": "POST", "headers": []}, receive, send)
    start, body = sent[0], b"".join(message.get("body", b"") for message in sent[1:])
    return start["status"], dict(start["headers"]), body


def test_requests_past_the_cap_get_429_with_retry_after_and_the_slots_come_back():
    async def main() -> None:
        app = HeldApp()
        middleware = ConcurrencyLimitMiddleware(app, limit=3)
        held = [asyncio.create_task(_call(middleware)) for _ in range(3)]
        while app.started < 3:
            await asyncio.sleep(0)
        status, headers, body = await _call(middleware)
        assert status == 429 and headers[b"retry-after"] == b"1"
        assert "3 requests are in progress" in json.loads(body)["error"]
        # Health checks and metrics are never refused.
        app.release.set()
        assert (await _call(middleware, "/livez"))[0] == 200
        assert [answer[0] for answer in await asyncio.gather(*held)] == [200, 200, 200]
        assert middleware.in_progress == 0

    asyncio.run(main())


def test_a_failed_or_cancelled_request_gives_its_slot_back():
    async def main() -> None:
        app = HeldApp()
        middleware = ConcurrencyLimitMiddleware(app, limit=2)
        failing = asyncio.create_task(_call(middleware, "/fails"))
        cancelled = asyncio.create_task(_call(middleware))
        while app.started < 2:
            await asyncio.sleep(0)
        assert middleware.in_progress == 2
        cancelled.cancel()
        app.release.set()
        with pytest.raises(RuntimeError, match="the model broke"):
            await failing
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert middleware.in_progress == 0
        assert (await _call(middleware))[0] == 200

    asyncio.run(main())
