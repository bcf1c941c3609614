"""Load tests: the locust users against a real service (a short smoke run of each), the answer
checks, the runner's settings and the report generator on a recorded locust CSV."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from services import RunningService

from cnnkit.loadtests.answers import AnswerError, LocustTimingInterceptor, check_probabilities, check_top_k
from cnnkit.loadtests.report import read_locust_csv, write_report
from cnnkit.loadtests.runner import LoadTestError, parse_duration, parse_levels, run_loadtest

RECORDED = Path(__file__).parent / "data" / "locust"


@pytest.mark.data
def test_each_locust_user_runs_against_a_real_service_without_failures(digits_repository, data_root, tmp_path):
    repository = tmp_path / "model_repository"
    shutil.copytree(digits_repository, repository)
    service = RunningService(repository)
    try:
        results = run_loadtest(url=service.url, grpc_target=f"127.0.0.1:{service.grpc_port}", model="digits",
                               levels=[2], seconds=6, report=tmp_path / "report",
                               protocols=["http", "grpc", "v2-json", "v2-binary", "v2-grpc"],
                               server_pid=service.pid, data_dir=str(data_root),
                               feature_map_weight=19,  # half the calls, so that a short run sees both
                               processes=2)  # locust's forked load processes; their figures are merged
    finally:
        service.stop()
    assert [(result.protocol, result.users) for result in results] == [
        ("http", 2), ("grpc", 2), ("v2-json", 2), ("v2-binary", 2), ("v2-grpc", 2)]
    for result in results:
        # A loaded machine (CI beside training runs) may start the users late: some requests, no failures.
        assert result.requests >= 3 and result.failures == 0, result.failure_messages
        assert result.mean_batch_size is not None and result.mean_batch_size >= 1
        assert result.server_cpu_percent and result.server_cpu_percent > 0
        assert result.server_rss_mb_end and result.server_rss_mb_end > 100
    assert {"POST predict", "POST feature_maps"} <= set(results[0].by_name)  # the HTTP mix
    assert set(results[1].by_name) == {"grpc Predict"}
    assert set(results[2].by_name) == {"POST v2 infer (JSON)"} and set(results[3].by_name) == {"POST v2 infer (binary)"}
    assert set(results[4].by_name) == {"grpc ModelInfer"}
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["meta"]["model"] == "digits" and len(report["levels"]) == 5
    assert report["meta"]["locust processes"] == 2
    assert len(list((tmp_path / "report" / "raw" / "images").glob("*.png"))) == 200


def test_answer_checks_turn_wrong_answers_into_failures():
    names = ["cat", "dog", "bird"]
    check_top_k([[{"class": "dog", "probability": 0.7}, {"class": "cat", "probability": 0.2},
                  {"class": "bird", "probability": 0.1}]], names, 3)
    with pytest.raises(AnswerError, match="unknown class"):
        check_top_k([[{"class": "cow", "probability": 0.7}, {"class": "cat", "probability": 0.2},
                      {"class": "bird", "probability": 0.1}]], names, 3)
    with pytest.raises(AnswerError, match="not sorted"):
        check_top_k([[{"class": "dog", "probability": 0.1}, {"class": "cat", "probability": 0.2},
                      {"class": "bird", "probability": 0.7}]], names, 3)
    with pytest.raises(AnswerError, match="1 row of 3"):
        check_top_k([], names, 3)
    check_probabilities(np.array([[0.2, 0.8]]), 2)
    with pytest.raises(AnswerError, match="shape"):
        check_probabilities(np.array([[0.2, 0.8]]), 3)
    with pytest.raises(AnswerError, match="sum to 1"):
        check_probabilities(np.array([[0.9, 0.8]]), 2)


class _Events:
    def __init__(self):
        self.fired = []

    @property
    def request(self):
        return self

    def fire(self, **event):
        self.fired.append(event)


class _Environment:
    def __init__(self):
        self.events = _Events()


class _Call:
    def __init__(self, response=None, error=None):
        self.response, self.error = response, error

    def result(self):
        if self.error:
            raise self.error
        return self.response


class _Details:
    method = "/tensorflow.serving.PredictionService/Predict"


class _Response:
    def ByteSize(self):  # noqa: N802 - protobuf's name
        return 42


def test_the_grpc_interceptor_reports_timing_errors_and_wrong_answers():
    environment = _Environment()

    def reject(response):
        raise AnswerError("probabilities do not sum to 1")

    interceptor = LocustTimingInterceptor(environment, {_Details.method: reject})
    interceptor.intercept_unary_unary(lambda details, request: _Call(_Response()), _Details(), None)
    failing = grpc.RpcError()
    interceptor.intercept_unary_unary(lambda details, request: _Call(error=failing), _Details(), None)
    fine = LocustTimingInterceptor(environment, {})
    fine.intercept_unary_unary(lambda details, request: _Call(_Response()), _Details(), None)
    first, second, third = environment.events.fired
    assert first["name"] == "Predict" and first["request_type"] == "grpc" and first["response_length"] == 42
    assert isinstance(first["exception"], AnswerError) and second["exception"] is failing
    assert third["exception"] is None and third["response_time"] >= 0


def test_runner_settings_are_checked():
    assert parse_levels("1,8,32,64") == [1, 8, 32, 64]
    assert [parse_duration(text) for text in ("30s", "2m", "1m30s", "45")] == [30, 120, 90, 45]
    for bad in ("0", "a,b", ""):
        with pytest.raises(LoadTestError):
            parse_levels(bad)
    for bad in ("soon", "0s"):
        with pytest.raises(LoadTestError):
            parse_duration(bad)
    with pytest.raises(LoadTestError, match="loopback"):
        run_loadtest(url="http://example.com:3000", grpc_target=None, model="m", levels=[1], seconds=1,
                     report=Path("unused"), protocols=["http"])
    with pytest.raises(LoadTestError, match="processes"):
        run_loadtest(url="http://127.0.0.1:9", grpc_target=None, model="m", levels=[1], seconds=1,
                     report=Path("unused"), protocols=["http"], processes=0)
    with pytest.raises(LoadTestError, match="protocols"):
        run_loadtest(url="http://127.0.0.1:9", grpc_target=None, model="m", levels=[1], seconds=1,
                     report=Path("unused"), protocols=["ftp"])


def test_the_report_from_a_recorded_locust_csv(tmp_path):
    result = read_locust_csv(RECORDED / "http-8", protocol="http", users=8, seconds=5)
    assert (result.requests, result.failures) == (143, 0)
    assert result.median_ms == 96 and result.p99_ms == 210 and result.requests_per_second == pytest.approx(50.89, 0.01)
    assert result.by_name["POST feature_maps"]["requests"] == 10
    assert result.failure_messages == {
        "predict: wrong answer: unknown class in [{'class': 'cat'}]": 3,
        "feature_maps: HTTP 503: Service Unavailable": 1}
    result.mean_batch_size, result.server_cpu_percent = 3.6, 150.0
    faster = read_locust_csv(RECORDED / "http-8", protocol="grpc", users=8, seconds=5)
    written = write_report([result, faster], tmp_path, {"model": "digits", "cpus": 2})
    markdown = written["markdown"].read_text()
    assert "| http | 8 | 143 | 0 | 50.9 | 96 | 190 | 210 | 3.6 | 150 |" in markdown
    assert "3 × predict: wrong answer" in markdown
    for picture in ("throughput", "latency"):
        with Image.open(written[picture]) as image:
            assert image.size[0] >= 600
    assert json.loads(written["json"].read_text())["levels"][0]["p95_ms"] == 190
    with pytest.raises(FileNotFoundError, match="no statistics"):
        read_locust_csv(tmp_path / "missing", protocol="http", users=1, seconds=1)
