"""The OpenAPI document's corrections (cnnkit.serving.http.openapi), on a document shaped like BentoML's."""

from __future__ import annotations

from cnnkit.serving.http.openapi import EXTRA_PATHS, complete


def test_the_mounted_routes_are_added_and_the_error_detail_is_a_list():
    document = {
        "paths": {"/predict": {"post": {}}},
        "components": {"schemas": {"InvalidArgument": {"type": "object", "properties": {
            "error": {"type": "string"}, "detail": {"type": "string"}}}}},
    }
    completed = complete(document)
    assert set(completed["paths"]) == {"/predict", *EXTRA_PATHS}
    assert "/v1/models/{name}:predict" in completed["paths"] and "/models/{name}/layers" in completed["paths"]
    assert completed["components"]["schemas"]["InvalidArgument"]["properties"]["detail"]["type"] == "array"
    assert document["components"]["schemas"]["InvalidArgument"]["properties"]["detail"]["type"] == "string"
    # A route BentoML documents itself is left as it is.
    assert complete({"paths": {"/models/": {"get": {"summary": "theirs"}}}})["paths"]["/models/"] == {
        "get": {"summary": "theirs"}}
