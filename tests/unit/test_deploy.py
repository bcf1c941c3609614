"""The deployment files are valid without a cluster or a Docker engine: every Kubernetes manifest
against the Kubernetes schemas (kubernetes-validate, strict), the custom resources by their
structure, the compose file against the Compose Specification's JSON schema (tests/data, from
compose-spec/compose-spec, Apache-2.0), and all of them against what the service really serves
(ports, probe paths, commands, metric names)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.33.0"
CUSTOM_KINDS = {"ServiceMonitor", "InferenceService"}
MANIFESTS = sorted([*DEPLOY.joinpath("kubernetes").rglob("*.yaml"), *DEPLOY.joinpath("kserve").rglob("*.yaml")])


def documents() -> list[tuple[Path, dict]]:
    return [(path, document) for path in MANIFESTS for document in yaml.safe_load_all(path.read_text()) if document]


@pytest.mark.parametrize(("path", "document"), documents(), ids=lambda value: getattr(value, "name", None)
                         or value.get("kind") if isinstance(value, Path | dict) else None)
def test_every_manifest_is_valid(path, document):
    if document["kind"] in CUSTOM_KINDS:
        assert document["apiVersion"] in ("monitoring.coreos.com/v1", "serving.kserve.io/v1beta1")
        assert document["metadata"]["name"] and document["spec"]
        return
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def _containers(document: dict) -> list[dict]:
    spec = document["spec"]
    if document["kind"] == "InferenceService":
        return spec["predictor"]["containers"]
    return spec["template"]["spec"]["containers"]


def test_manifests_fit_the_service():
    from cnnkit.cli import build_parser

    found = {(document["kind"], document["metadata"]["name"]): document for _, document in documents()}
    service = found[("Service", "cnnkit")]
    deployment = found[("Deployment", "cnnkit")]
    # The Service, the budget, the autoscaler and the monitor all point at the Deployment's pods.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert found[("PodDisruptionBudget", "cnnkit")]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert found[("ServiceMonitor", "cnnkit")]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert found[("HorizontalPodAutoscaler", "cnnkit")]["spec"]["scaleTargetRef"]["name"] == "cnnkit"
    parser = build_parser()
    for document in [document for document in found.values() if document["kind"] in ("Deployment", "InferenceService")]:
        for container in _containers(document):
            command = container["command"]
            assert command[:2] == ["cnnkit", "serve"]
            arguments = parser.parse_args(command[1:])  # the command line the image really accepts
            ports = {port["containerPort"] for port in container["ports"]}
            assert arguments.http_port in ports
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container:
                    assert container[probe]["httpGet"]["path"] in ("/readyz", "/livez", "/v2/health/ready")
            names = {variable["name"] for variable in container["env"]}
            assert {"CNNKIT_MODEL_REPOSITORY", "BENTOML_HOME"} <= names
            if container.get("securityContext", {}).get("readOnlyRootFilesystem"):
                # BentoML, the settings file and the caches write under /tmp and /cache: writable volumes.
                mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
                assert {"/tmp", "/cache"} <= mounts
    gpu = found[("Deployment", "cnnkit-gpu")]
    assert _containers(gpu)[0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_settings_named_in_the_manifests_exist():
    from cnnkit.settings import Settings

    known = {variable for variable, _, _ in Settings.table()}
    for _, document in documents():
        if document["kind"] in ("Deployment", "InferenceService"):
            for container in _containers(document):
                for variable in container["env"]:
                    if variable["name"].startswith("CNNKIT_"):
                        assert variable["name"] in known, variable["name"]


def test_the_compose_file_follows_the_compose_specification():
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(compose)
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./deploy"):
                assert (ROOT / source).is_file(), source
    assert yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0][
        "static_configs"][0]["targets"] == ["cnnkit:3000"]


def test_the_dashboard_queries_the_services_metrics():
    from cnnkit.serving import metrics

    dashboard = json.loads((DEPLOY / "grafana" / "cnnkit-dashboard.json").read_text())
    exported = {metric.describe()[0].name for metric in (metrics.requests_total, metrics.errors_total,
                                                          metrics.latency_seconds, metrics.batch_size,
                                                          metrics.images_total)}
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\b(cnnkit_[a-z_]+?)(?:_total|_bucket|_sum|_count)?\{", target["expr"])}
    assert queried and queried <= exported, queried - exported


def test_the_validators_catch_mistakes():
    """The checks above can fail: a misspelt field and a wrong type are refused."""
    deployment = next(document for _, document in documents() if document["kind"] == "Deployment")
    misspelt = json.loads(json.dumps(deployment))
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong = json.loads(json.dumps(deployment))
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSION, strict=True)
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    compose["services"]["cnnkit"]["ports"] = "3000"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft201909Validator(json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
                                        ).validate(compose)
