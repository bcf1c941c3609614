"""What BentoML's OpenAPI document leaves out or gets wrong about cnnkit's HTTP API, put right.

BentoML documents its own routes. The Starlette apps mounted beside them (TF Serving's REST API
under ``/v1``, the model list under ``/models``) are missing, and its error schema says ``detail``
is a string where the answers carry a list (pydantic's validation errors). :func:`complete` takes
the document as a dict and returns it completed; the service serves that at ``/docs.json``, which
the schema-based fuzzer (``tests/service/test_fuzzing.py``) runs against the real service.
"""

from __future__ import annotations

import copy
from typing import Any

_ERROR = {"$ref": "#/components/schemas/InvalidArgument"}
_NOT_FOUND = {"$ref": "#/components/schemas/NotFound"}
_JSON_OBJECT = {"type": "object", "additionalProperties": True}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "Model name in the repository."}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _answers(ok: str, *, body: bool = False) -> dict[str, Any]:
    answers = {"200": _json(_JSON_OBJECT, ok), "404": _json(_NOT_FOUND, "Unknown model or version")}
    if body:
        answers["400"] = _json(_ERROR, "Bad Request")
        answers["413"] = _json(_ERROR, "Too many images or a body over the limit")
        answers["503"] = _json(_ERROR, "Overloaded; retry after the Retry-After header's seconds")
    return answers


_TF_PREDICT_BODY = {
    "type": "object",
    "description": "TF Serving's REST predict request: exactly one of 'instances' (row format) or 'inputs' "
                   "(columnar); values are pixel arrays (0..255) or {\"b64\": encoded image file}.",
    "properties": {
        "instances": {"type": "array", "items": {}},
        "inputs": {},
        "signature_name": {"type": "string", "enum": ["serving_default", "predict", "feature_maps"]},
    },
}

EXTRA_PATHS: dict[str, dict[str, Any]] = {
    "/v1/models/{name}:predict": {"post": {
        "tags": ["TF Serving REST"], "summary": "Predict (TF Serving's REST API)",
        "operationId": "tf_serving_predict", "parameters": [_NAME],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _TF_PREDICT_BODY}}},
        "responses": _answers("{\"predictions\": [...]} (row format) or {\"outputs\": {...}}", body=True),
    }},
    "/v1/models/{name}": {"get": {
        "tags": ["TF Serving REST"], "summary": "Model version status (TF Serving's REST API)",
        "operationId": "tf_serving_status", "parameters": [_NAME],
        "responses": _answers("{\"model_version_status\": [...]}"),
    }},
    "/v1/models/{name}/metadata": {"get": {
        "tags": ["TF Serving REST"], "summary": "Model metadata with its signature_def (TF Serving's REST API)",
        "operationId": "tf_serving_metadata", "parameters": [_NAME],
        "responses": _answers("{\"model_spec\": ..., \"metadata\": {\"signature_def\": ...}}"),
    }},
    "/models/": {"get": {
        "tags": ["Models"], "summary": "Every served model (its latest version)", "operationId": "list_models",
        "responses": {"200": _json({"type": "array", "items": _JSON_OBJECT}, "The models")},
    }},
    "/models/{name}": {"get": {
        "tags": ["Models"], "summary": "One model: versions, classes, input, layers", "operationId": "describe_model",
        "parameters": [_NAME], "responses": _answers("The model's description"),
    }},
    "/models/{name}/layers": {"get": {
        "tags": ["Models"], "summary": "The model's feature layers with their output shapes",
        "operationId": "model_layers", "parameters": [_NAME], "responses": _answers("The layers"),
    }},
}


def complete(document: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document with the mounted routes added and the error schema made true."""
    completed = copy.deepcopy(document)
    schemas = completed.setdefault("components", {}).setdefault("schemas", {})
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schema = schemas.get(name)
        if isinstance(schema, dict) and "detail" in schema.get("properties", {}):
            schema["properties"]["detail"] = {
                "type": "array", "items": {"type": "object"}, "title": "Error Detail",
                "description": "For a body that failed validation: one entry per field (pydantic's errors).",
            }
    for path, item in EXTRA_PATHS.items():
        completed.setdefault("paths", {}).setdefault(path, copy.deepcopy(item))
    return completed
