"""The request models shared by the HTTP routes and the gRPC JSON extensions."""

from __future__ import annotations

import pytest

from cnnkit.errors import InvalidInputError
from cnnkit.serving.requests import (
    EmptyRequest,
    FeatureMapsJsonRequest,
    FilterPatternsRequest,
    GradCamJsonRequest,
    ModelRequest,
    PredictJsonRequest,
    PredictRequest,
    parse,
)


def test_defaults_and_the_fields_a_request_names():
    request = parse(FilterPatternsRequest, {"model": "digits"})
    assert (request.version, request.layer, request.filters, request.steps, request.seed, request.arrays) == (
        None, None, None, 40, 0, False)
    assert parse(FilterPatternsRequest, {"model": "digits", "filters": [0, 3]}).filters == [0, 3]
    assert parse(FilterPatternsRequest, {"model": "digits", "filters": 8}).filters == 8
    assert parse(PredictRequest, {"model": "digits"}).top_k == 5


def test_multipart_form_strings_become_integers():
    """Multipart forms carry every field as text; numbers in JSON stay numbers."""
    assert parse(PredictRequest, {"model": "digits", "version": "2", "top_k": "3"}).top_k == 3
    assert parse(PredictRequest, {"model": "digits", "version": 2}).version == 2


@pytest.mark.parametrize(("model", "body", "message"), [
    (ModelRequest, {}, "'model' is required"),
    (ModelRequest, {"model": ""}, "'model' String should have at least 1 character"),
    (ModelRequest, {"model": "digits", "version": 0}, "'version' Input should be greater than or equal to 1"),
    (ModelRequest, {"model": "digits", "version": True}, "'version' must be an integer, not true or false"),
    (ModelRequest, {"model": 7}, "'model' Input should be a valid string"),
    (ModelRequest, {"model": "digits", "modle": "x"}, "'modle' is not a field of this request"),
    (PredictRequest, {"model": "digits", "top_k": 0}, "'top_k' Input should be greater than or equal to 1"),
    (PredictJsonRequest, {"model": "digits"}, "exactly one of 'images' (base64 files) or 'instances'"),
    (PredictJsonRequest, {"model": "digits", "images": ["a"], "instances": [[0]]}, "exactly one of"),
    (FeatureMapsJsonRequest, {"model": "digits"}, "'image_b64' is required"),
    (FeatureMapsJsonRequest, {"model": "digits", "image_b64": "x", "layers": "conv1"}, "'layers' Input should be"),
    (FeatureMapsJsonRequest, {"model": "digits", "image_b64": "x", "output": "gif"}, "'output' Input should be"),
    (GradCamJsonRequest, {"model": "digits", "image_b64": "x", "class_name": "3", "class_index": 3},
     "at most one of 'class_name' and 'class_index'"),
    (GradCamJsonRequest, {"model": "digits", "image_b64": "x", "dtype": "int8"},
     "'dtype' Input should be 'float16' or 'float32'"),
    (GradCamJsonRequest, {"model": "digits", "image_b64": "x", "class_index": True}, "not true or false"),
    (GradCamJsonRequest, {"model": "digits", "image_b64": "x", "class_name": [7]}, "'class_name' Input should be"),
    (FilterPatternsRequest, {"model": "digits", "filters": "all"},
     "'filters' must be a count or a list of filter indices"),
    (FilterPatternsRequest, {"model": "digits", "filters": [1, "2"]}, "'filters' must be a count or a list"),
    (FilterPatternsRequest, {"model": "digits", "seed": -1}, "'seed' Input should be greater than or equal to 0"),
    (FilterPatternsRequest, {"model": "digits", "steps": "many"}, "'steps' Input should be a valid integer"),
    (EmptyRequest, {"model": "digits"}, "'model' is not a field of this request"),
])
def test_bad_fields_are_named_in_one_line(model, body, message):
    with pytest.raises(InvalidInputError) as refused:
        parse(model, body)
    assert message in refused.value.message
    assert "\n" not in refused.value.message and refused.value.http_status == 400


def test_a_body_that_is_not_an_object_is_refused():
    with pytest.raises(InvalidInputError, match="must be a JSON object"):
        parse(ModelRequest, ["digits"])


def test_a_class_named_by_a_number_is_that_numeral():
    """A multipart form field class_name=7 arrives decoded as the number 7; the digits' classes are
    named "0".."9", so the number names the class "7" (true/false stays refused)."""
    assert parse(GradCamJsonRequest, {"model": "digits", "image_b64": "x", "class_name": 7}).class_name == "7"
    with pytest.raises(InvalidInputError, match="class_name"):
        parse(GradCamJsonRequest, {"model": "digits", "image_b64": "x", "class_name": True})
