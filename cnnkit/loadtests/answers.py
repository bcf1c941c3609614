"""Answer checks and the gRPC timing interceptor of the locust users (kept apart from the
locustfile, which patches gRPC for gevent when imported)."""

from __future__ import annotations

import time

import grpc
import numpy as np


class AnswerError(Exception):
    """The service answered, but not with what a correct answer looks like."""


def check_top_k(rows: list, class_names: list[str], k: int) -> None:
    if len(rows) != 1 or len(rows[0]) != min(k, len(class_names)):
        raise AnswerError(f"expected 1 row of {k} classes, got {rows!r:.200}")
    probabilities = [entry["probability"] for entry in rows[0]]
    if any(entry["class"] not in class_names for entry in rows[0]):
        raise AnswerError(f"unknown class in {rows[0]!r:.200}")
    if probabilities != sorted(probabilities, reverse=True) or not all(0 <= p <= 1 for p in probabilities):
        raise AnswerError(f"probabilities not sorted within 0..1: {probabilities}")


def check_probabilities(probabilities: np.ndarray, classes: int) -> None:
    if probabilities.shape != (1, classes):
        raise AnswerError(f"expected probabilities of shape (1, {classes}), got {probabilities.shape}")
    if not np.isfinite(probabilities).all() or abs(float(probabilities.sum()) - 1.0) > 1e-3:
        raise AnswerError(f"probabilities do not sum to 1: {probabilities}")


class LocustTimingInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Times every unary call, runs the method's answer check, and reports one locust request."""

    def __init__(self, environment, checks: dict):
        self.environment = environment
        self.checks = checks

    def intercept_unary_unary(self, continuation, client_call_details, request):
        started = time.perf_counter()
        exception: Exception | None = None
        length = 0
        call = continuation(client_call_details, request)
        try:
            response = call.result()
            length = response.ByteSize()
            check = self.checks.get(client_call_details.method)
            if check is not None:
                check(response)
        except grpc.RpcError as error:
            exception = error
        except AnswerError as error:
            exception = error
        self.environment.events.request.fire(
            request_type="grpc", name=client_call_details.method.rsplit("/", 1)[-1],
            response_time=(time.perf_counter() - started) * 1000, response_length=length,
            exception=exception, context={},
        )
        return call
