"""The request bodies of the service, as pydantic models shared by every front end.

The HTTP routes (JSON bodies and multipart forms) and the gRPC JSON extensions
(``/cnnkit.v1.Extensions/...``) validate what they receive with these models through
:func:`parse`, and the OpenAPI document shows them as the routes' bodies. So a field means and is
checked the same everywhere. Semantic checks that need the model (a layer name, a class, a filter
index) happen later, in the inference core and :mod:`cnnkit.explain`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from cnnkit.errors import InvalidInputError

Dtype = Literal["float16", "float32"]


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be an integer, not true or false")
    return value


def _list_or_array(value: Any) -> Any:
    if isinstance(value, list | np.ndarray):
        return value
    raise ValueError("must be a nested list of numbers")


# Nested lists of numbers; a long one arrives already parsed into a numpy array (large bodies are
# parsed by the JSON worker, cnnkit.serving.json_worker). The documented schema is a JSON array.
PixelTensor = Annotated[Any, PlainValidator(_list_or_array), WithJsonSchema({"type": "array", "items": {}})]

def _name_as_text(value: Any) -> Any:
    # A multipart form field "7" arrives decoded as the number 7 (BentoML reads form values as
    # JSON); class names such as the digits' are numerals, so a number names the class "7".
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


ClassName = Annotated[str, BeforeValidator(_name_as_text)]

# Integers may arrive as JSON numbers or, from multipart forms, as strings ("3"); true/false is refused.
Integer = Annotated[int, BeforeValidator(_not_a_bool)]


class ModelRequest(BaseModel):
    """Which model version a request is for: the latest unless ``version`` pins one."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="Model name in the repository.")
    version: Integer | None = Field(None, ge=1, description="Model version (default: the latest).")


class PredictRequest(ModelRequest):
    """``POST /predict`` (one uploaded image file)."""

    top_k: Integer = Field(5, ge=1, description="How many classes to return, most probable first.")


class PredictJsonRequest(PredictRequest):
    """``POST /predict_json``: base64 image files or a pixel tensor."""

    images: list[str] | None = Field(None, description="Encoded image files (JPEG, PNG, ...) in base64.")
    instances: PixelTensor | None = Field(None, description="Raw pixels 0..255, (N, H, W, C) or (H, W, C).")

    @model_validator(mode="after")
    def _one_input(self) -> PredictJsonRequest:
        if (self.images is None) == (self.instances is None):
            raise ValueError("Send exactly one of 'images' (base64 files) or 'instances' (pixels).")
        return self


class FeatureMapsRequest(ModelRequest):
    """``POST /feature_maps`` (one uploaded image file)."""

    layers: list[str] | None = Field(None, description="Layer names (default: every convolution).")
    output: Literal["array", "png"] = Field("array", description="Arrays (base64) or PNG grids.")
    dtype: Dtype = Field("float16", description="Data type of the arrays.")


class FeatureMapsJsonRequest(FeatureMapsRequest):
    """``POST /feature_maps_json`` and gRPC ``FeatureMapPngs``."""

    image_b64: str = Field(description="The image file in base64.")


class GradCamRequest(ModelRequest):
    """``POST /gradcam`` (one uploaded image file)."""

    class_name: ClassName | None = Field(None, description="Class to explain, by name (default: the predicted one).")
    class_index: Integer | None = Field(None, description="Class to explain, by index.")
    dtype: Dtype = Field("float16", description="Data type of the heatmap array.")

    @model_validator(mode="after")
    def _one_class(self) -> GradCamRequest:
        if self.class_name is not None and self.class_index is not None:
            raise ValueError("Send at most one of 'class_name' and 'class_index'.")
        return self


class GradCamJsonRequest(GradCamRequest):
    """``POST /gradcam_json`` and gRPC ``GradCam``."""

    image_b64: str = Field(description="The image file in base64.")


def _filter_choice(value: Any) -> Any:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, list) and all(isinstance(index, int) and not isinstance(index, bool) for index in value):
        return value
    raise ValueError("must be a count or a list of filter indices")


class FilterPatternsRequest(ModelRequest):
    """``POST /filter_patterns`` and gRPC ``FilterPatterns``."""

    layer: str | None = Field(None, description="Convolution layer (default: the last one).")
    filters: Annotated[int | list[int] | None, BeforeValidator(_filter_choice)] = Field(
        None, description="The first N filters, or a list of filter indices (default: the first 64).")
    steps: Integer = Field(40, description="Gradient-ascent steps (1 to 200).")
    seed: Integer = Field(0, ge=0, description="Seed of the starting noise.")
    arrays: bool = Field(False, description="Also return the patterns as a uint8 array.")


class EmptyRequest(BaseModel):
    """gRPC ``ListModels`` takes no fields."""

    model_config = ConfigDict(extra="forbid")


Request = TypeVar("Request", bound=BaseModel)


def validation_message(error: ValidationError) -> str:
    """One line naming every field that is wrong and why."""
    problems = []
    for item in error.errors(include_url=False):
        # Union members show up in the location ("filters.list[int]"); name the field alone.
        location = ".".join(str(part) for part in item["loc"] if "[" not in str(part))
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "is not a field of this request"
        elif item["type"] == "missing":
            message = "is required"
        problems.append(f"'{location}' {message}" if location else message)
    return "; ".join(problems) + ("" if problems[-1].endswith(".") else ".")


def parse(model: type[Request], body: Any) -> Request:
    """``body`` (decoded JSON) validated as ``model``, or InvalidInputError with a one-line message."""
    if not isinstance(body, dict):
        raise InvalidInputError("The request must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise InvalidInputError(validation_message(error)) from error
