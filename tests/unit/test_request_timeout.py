"""The request timeout (BentoML's ``traffic.timeout``) answers 504 in time and leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import weakref

import pytest

from cnnkit.serving.http.middleware import RequestTimeoutMiddleware

REQUEST_STATE: contextvars.ContextVar = contextvars.ContextVar("request_state")


class RequestState:
    """Stands for what a request's context holds (BentoML's OpenTelemetry span, for one)."""


async def _call(middleware, path: str = "/predict") -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "method": "POST", "headers": []}
    await middleware(scope, receive, send)
    return sent


async def _answer(send, status: int = 200, body: bytes = b"ok") -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_a_request_without_an_answer_in_time_gets_504_and_its_work_is_cancelled():
    cancelled = []

    async def slow_app(scope, receive, send):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        await _answer(send)

    async def main() -> tuple[list[dict], float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = await _call(RequestTimeoutMiddleware(slow_app, timeout=0.05))
        return sent, loop.time() - started

    sent, seconds = asyncio.run(main())
    assert seconds < 2
    assert cancelled == [True]
    assert sent[0]["status"] == 504
    assert "0.05 seconds" in json.loads(sent[1]["body"])["error"]


def test_a_response_that_has_started_may_stream_past_the_timeout():
    async def streaming_app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in range(3):
            await asyncio.sleep(0.05)
            await send({"type": "http.response.body", "body": b"part", "more_body": part < 2})

    sent = asyncio.run(_call(RequestTimeoutMiddleware(streaming_app, timeout=0.04)))
    assert sent[0]["status"] == 200
    assert [message.get("more_body") for message in sent[1:]] == [True, True, False]


def test_an_error_before_the_answer_reaches_the_caller_at_once():
    async def failing_app(scope, receive, send):
        raise RuntimeError("broken handler")

    async def main() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RuntimeError, match="broken handler"):
            await _call(RequestTimeoutMiddleware(failing_app, timeout=30))
        return loop.time() - started

    assert asyncio.run(main()) < 1


def _request_state_outlives_the_request(middleware_class) -> bool:
    """Serve one request whose context holds a RequestState; whether that object is still alive
    (held by a pending timer) once the request has been answered."""

    async def app(scope, receive, send):
        await _answer(send)

    async def main() -> bool:
        middleware = middleware_class(app, timeout=60)

        async def one_request() -> weakref.ref:
            state = RequestState()
            REQUEST_STATE.set(state)
            sent = await _call(middleware)
            assert sent[0]["status"] == 200
            return weakref.ref(state)

        # A timer due before the request's stays pending (a server has such timers), so a
        # cancelled timer of the request's stays in the event loop's queue for now.
        loop = asyncio.get_running_loop()
        earlier = loop.call_later(30, lambda: None, context=contextvars.Context())
        # A task of its own, as a server gives each request: its context is a copy, alive with
        # the task (until it is dropped) and with whatever else copied it.
        request = loop.create_task(one_request())
        reference = await request
        del request
        await asyncio.sleep(0)
        gc.collect()
        earlier.cancel()
        return reference() is not None

    return asyncio.run(main())


def test_an_answered_request_leaves_no_timer_holding_its_context():
    assert not _request_state_outlives_the_request(RequestTimeoutMiddleware)


def test_bentomls_own_timeout_middleware_keeps_each_request_alive_for_the_whole_timeout():
    """Why cnnkit replaces it: if this starts failing, BentoML has fixed its middleware and the
    replacement (``use_request_timeout_middleware``) can go."""
    from bentoml._internal.server.http import traffic

    from cnnkit.serving.http import middleware

    original = middleware.BENTOML_TIMEOUT_MIDDLEWARE or traffic.TimeoutMiddleware
    assert original is not RequestTimeoutMiddleware
    assert _request_state_outlives_the_request(original)


def test_the_service_has_bentoml_build_cnnkits_timeout_middleware():
    from bentoml._internal.server.http import traffic

    import cnnkit.serving.http.service  # noqa: F401 - importing the service installs it

    assert traffic.TimeoutMiddleware is RequestTimeoutMiddleware
