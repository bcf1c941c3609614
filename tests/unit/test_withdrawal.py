"""Withdrawing work whose caller went away: the caller watch and the worker's job queue."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from cnnkit.serving.callers import CallerWatch, current_caller, watching
from cnnkit.serving.workers import CANCEL, JobCancelledError, JobQueue, job_cancelled


def test_a_caller_watch_runs_its_callbacks_once_and_late_ones_at_once():
    caller = CallerWatch()
    calls: list[str] = []
    caller.on_leave(lambda: calls.append("first"))
    forget = caller.on_leave(lambda: calls.append("forgotten"))
    forget()
    caller.on_leave(lambda: 1 / 0)  # a failing callback does not stop the others
    caller.on_leave(lambda: calls.append("second"))
    caller.leave()
    caller.leave()
    assert calls == ["first", "second"] and caller.gone
    caller.on_leave(lambda: calls.append("late"))
    assert calls == ["first", "second", "late"]


def test_the_current_caller_is_seen_by_threads_started_with_its_context():
    import contextvars

    caller = CallerWatch()
    seen: list[object] = []
    with watching(caller):
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(lambda: seen.append(current_caller()),))
        thread.start()
        thread.join()
    assert seen == [caller] and current_caller() is None


class Connection:
    """A worker connection in memory: requests in, answers out."""

    def __init__(self, jobs: JobQueue):
        self.requests: queue.Queue = queue.Queue()
        self.answers: queue.Queue = queue.Queue()
        self.reader = threading.Thread(target=jobs.read, args=(self.requests.get, self.answers.put), daemon=True)
        self.reader.start()

    def answer(self) -> tuple:
        return self.answers.get(timeout=10)


def run_jobs(jobs: JobQueue, functions: dict) -> threading.Thread:
    runner = threading.Thread(target=jobs.run, args=(functions,), daemon=True)
    runner.start()
    return runner


def test_a_withdrawn_job_that_has_not_started_is_answered_without_running():
    started = threading.Event()
    release = threading.Event()
    ran: list[int] = []

    def slow(value: int) -> int:
        started.set()
        release.wait(10)
        ran.append(value)
        return value

    jobs = JobQueue()
    connection = Connection(jobs)
    connection.requests.put((0, "slow", (1,)))
    connection.requests.put((1, "slow", (2,)))
    runner = run_jobs(jobs, {"slow": slow})
    assert started.wait(10)
    connection.requests.put((1, CANCEL, ()))  # withdrawn while the first one runs
    time.sleep(0.1)
    release.set()
    first, second = connection.answer(), connection.answer()
    assert first == (0, True, 1)
    assert second[:2] == (1, False) and isinstance(second[2], JobCancelledError)
    assert ran == [1]
    connection.requests.put(None)  # the connection ends
    jobs.stop()
    runner.join(10)


def test_a_running_job_sees_its_withdrawal_and_a_closed_connection_withdraws_everything():
    checks: list[bool] = []

    def steps(count: int) -> int:
        for done in range(count):
            if job_cancelled():
                raise JobCancelledError(f"stopped after {done} steps")
            time.sleep(0.01)
        return count

    jobs = JobQueue()
    runner = run_jobs(jobs, {"steps": steps, "check": lambda: checks.append(job_cancelled()) or True})
    connection = Connection(jobs)
    connection.requests.put((7, "steps", (3,)))
    assert connection.answer() == (7, True, 3)  # nobody withdrew it
    connection.requests.put((8, "steps", (10_000,)))
    time.sleep(0.2)
    connection.requests.put((8, CANCEL, ()))
    identifier, ok, error = connection.answer()
    assert (identifier, ok) == (8, False) and "stopped after" in str(error)

    # A second connection's jobs are withdrawn when it ends; a job of the first is not.
    other = Connection(jobs)
    other.requests.put((0, "steps", (10_000,)))
    connection.requests.put((9, "check", ()))
    time.sleep(0.2)
    other.requests.put(None)
    assert other.answer()[:2] == (0, False)
    assert connection.answer() == (9, True, True) and checks == [False]
    connection.requests.put(None)
    jobs.stop()
    runner.join(10)
    assert not runner.is_alive()


def test_withdrawing_an_answered_job_is_harmless():
    jobs = JobQueue()
    runner = run_jobs(jobs, {"echo": lambda value: value})
    connection = Connection(jobs)
    connection.requests.put((0, "echo", ("x",)))
    assert connection.answer() == (0, True, "x")
    connection.requests.put((0, CANCEL, ()))
    connection.requests.put((1, "echo", ("y",)))
    assert connection.answer() == (1, True, "y")
    with pytest.raises(queue.Empty):
        connection.answers.get(timeout=0.2)
    connection.requests.put(None)
    jobs.stop()
    runner.join(10)
