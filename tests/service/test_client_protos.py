"""The SDK's TensorFlow-free TF-Serving protos agree with the real ones, on the wire and over gRPC.

`cnnkit_client.protos.tfs` holds our own copies of TensorFlow Serving's protos, registered in a private
descriptor pool, and `cnnkit_client.tensors` converts between numpy arrays and TensorProto. This module compares
both against TensorFlow and tensorflow-serving-api, which are installed in the main environment.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, text_format

# The real service files import every other real file that we mirror, so the default pool then holds them all.
from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2  # noqa: F401

from cnnkit_client import tensors
from cnnkit_client.protos.tfs import _pool

OUR_PACKAGE = Path(_pool.__file__).parent
POOL = _pool.POOL

# Each role, with our module and the real module it mirrors. Their field names are identical, so the builders
# below take either namespace and build the same message from that set of classes.
MODULES = {
    "types": ("types_pb2", "tensorflow.core.framework.types_pb2"),
    "tensor": ("tensor_pb2", "tensorflow.core.framework.tensor_pb2"),
    "model": ("model_pb2", "tensorflow_serving.apis.model_pb2"),
    "predict": ("predict_pb2", "tensorflow_serving.apis.predict_pb2"),
    "classification": ("classification_pb2", "tensorflow_serving.apis.classification_pb2"),
    "metadata": ("get_model_metadata_pb2", "tensorflow_serving.apis.get_model_metadata_pb2"),
    "status": ("get_model_status_pb2", "tensorflow_serving.apis.get_model_status_pb2"),
    "prediction_service": ("prediction_service_pb2_grpc", "tensorflow_serving.apis.prediction_service_pb2_grpc"),
    "model_service": ("model_service_pb2_grpc", "tensorflow_serving.apis.model_service_pb2_grpc"),
}


def our_module(name):
    """One of our generated modules, for example our_module("predict_pb2")."""
    return importlib.import_module(f"cnnkit_client.protos.tfs.{name}")


OURS = SimpleNamespace(**{role: our_module(ours) for role, (ours, _) in MODULES.items()})
REAL = SimpleNamespace(**{role: importlib.import_module(real) for role, (_, real) in MODULES.items()})

# All of our generated files, each compared with its real twin.
OUR_FILES = sorted(path.stem for path in OUR_PACKAGE.glob("*_pb2.py"))


def real_file_mirrored_by(our_file):
    """The real file that holds the first message, enum or service of ours (TF and we use the same full names)."""
    symbols = [*our_file.message_types_by_name, *our_file.enum_types_by_name, *our_file.services_by_name]
    return descriptor_pool.Default().FindFileContainingSymbol(f"{our_file.package}.{symbols[0]}")


def file_descriptor_proto(file_descriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(proto)
    return proto


def messages_by_full_name(messages, prefix):
    """Yields (full name, DescriptorProto) for the messages and, recursively, their nested messages."""
    for message in messages:
        full_name = f"{prefix}.{message.name}"
        yield full_name, message
        yield from messages_by_full_name(message.nested_type, full_name)


def field_signature(message, field) -> tuple:
    """What a field must share with its twin: name, label, type, type name, JSON name, oneof and packing."""
    oneof = message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
    packed = field.options.packed if field.options.HasField("packed") else None
    return field.name, field.label, field.type, field.type_name, field.json_name, oneof, packed


def assert_enums_match(our_enums, their_enums):
    """Each enum we declare lists exactly the same value names and numbers as its upstream twin."""
    their_values = {enum.name: [(value.name, value.number) for value in enum.value] for enum in their_enums}
    for enum in our_enums:
        assert [(value.name, value.number) for value in enum.value] == their_values[enum.name], enum.name


@pytest.mark.parametrize("module_name", OUR_FILES)
def test_descriptors_match_the_real_files(module_name):
    our_descriptor = our_module(module_name).DESCRIPTOR
    assert our_descriptor.pool is POOL
    our_file = file_descriptor_proto(our_descriptor)
    their_file = file_descriptor_proto(real_file_mirrored_by(our_descriptor))
    assert (our_file.package, our_file.syntax) == (their_file.package, their_file.syntax)

    # Every message we declare exists upstream, and every field we declare has the same number and meaning.
    # Upstream fields that we leave out (listed in NOTES.md) are allowed: a peer's values for them stay unknown.
    their_messages = dict(messages_by_full_name(their_file.message_type, their_file.package))
    for full_name, our_message in messages_by_full_name(our_file.message_type, our_file.package):
        their_message = their_messages[full_name]
        assert our_message.options.map_entry == their_message.options.map_entry, full_name
        their_fields = {field.number: field for field in their_message.field}
        for field in our_message.field:
            assert field.number in their_fields, f"{full_name}.{field.name} = {field.number} is not upstream"
            their_field = their_fields[field.number]
            assert field_signature(our_message, field) == field_signature(their_message, their_field), full_name
        assert_enums_match(our_message.enum_type, their_message.enum_type)

    # Top-level enums, DataType and tensorflow.error.Code among them, list exactly the same values.
    assert_enums_match(our_file.enum_type, their_file.enum_type)

    # Each RPC we declare takes and returns the same messages as upstream.
    their_services = {service.name: service for service in their_file.service}
    for service in our_file.service:
        their_methods = {method.name: method for method in their_services[service.name].method}
        for method in service.method:
            their_method = their_methods[method.name]
            assert (method.input_type, method.output_type) == (their_method.input_type, their_method.output_type)


# Builders for the round trips. Each takes REAL or OURS and builds the same message from that set of classes.
def make_model_spec(modules, version_label=None):
    if version_label:
        return modules.model.ModelSpec(name="digits", signature_name="serving_default", version_label=version_label)
    # ModelSpec(version=wrappers_pb2.Int64Value(value=3)) raises TypeError for ours, because our pool has its own
    # Int64Value class. A dict (or setting spec.version.value) works for both sets of classes.
    return modules.model.ModelSpec(name="digits", signature_name="serving_default", version={"value": 3})


def make_tensor(modules, dtype_name, shape, **values):
    dimensions = {"dim": [{"size": size} for size in shape]}
    return modules.tensor.TensorProto(dtype=modules.types.DataType.Value(dtype_name), tensor_shape=dimensions, **values)


def build_predict_request(modules):
    images = make_tensor(modules, "DT_FLOAT", (2, 3), tensor_content=np.arange(6, dtype="<f4").tobytes())
    labels = make_tensor(modules, "DT_STRING", (2,), string_val=[b"cat", b"\x00dog\xff"])
    return modules.predict.PredictRequest(
        model_spec=make_model_spec(modules), inputs={"images": images, "labels": labels}, output_filter=["classes"]
    )


def build_predict_response(modules):
    classes = make_tensor(modules, "DT_INT64", (2,), int64_val=[7, -(2**63)])
    return modules.predict.PredictResponse(model_spec=make_model_spec(modules), outputs={"classes": classes})


def build_classification_request(modules):
    request = modules.classification.ClassificationRequest(model_spec=make_model_spec(modules))
    for index in range(2):
        feature = request.input.example_list.examples.add().features.feature
        feature["image"].bytes_list.value.append(b"\x89PNG" + bytes([index]))
        feature["scores"].float_list.value.extend([0.5, -2.0])
        feature["ids"].int64_list.value.extend([1, 2**40])
    return request


def build_classification_response(modules):
    response = modules.classification.ClassificationResponse(model_spec=make_model_spec(modules))
    classifications = response.result.classifications.add()
    for digit in range(3):
        classifications.classes.add(label=f"digit{digit}", score=0.25 * digit)
    return response


def build_signature_def_map(modules):
    signature_def_map = modules.metadata.SignatureDefMap()
    signature = signature_def_map.signature_def["serving_default"]
    signature.method_name = "tensorflow/serving/predict"
    images = signature.inputs["images"]
    images.name = "serving_default_images:0"
    images.dtype = modules.types.DT_UINT8
    for size in (-1, 28, 28, 1):  # A signature may leave the batch size unknown.
        images.tensor_shape.dim.add(size=size)
    signature.outputs["probabilities"].coo_sparse.values_tensor_name = "values:0"
    return signature_def_map


def build_model_metadata_response(modules):
    response = modules.metadata.GetModelMetadataResponse(model_spec=make_model_spec(modules))
    response.metadata["signature_def"].Pack(build_signature_def_map(modules))
    return response


def build_model_status_response(modules):
    response = modules.status.GetModelStatusResponse()
    response.model_version_status.add(version=3, state=modules.status.ModelVersionStatus.AVAILABLE)
    ended = response.model_version_status.add(version=2, state=modules.status.ModelVersionStatus.END)
    ended.status.error_code = 5  # NOT_FOUND
    ended.status.error_message = "unloaded"
    return response


BUILDERS = {
    "model_spec_with_version": make_model_spec,
    "model_spec_with_version_label": lambda modules: make_model_spec(modules, version_label="stable"),
    "predict_request": build_predict_request,
    "predict_response": build_predict_response,
    "classification_request": build_classification_request,
    "classification_response": build_classification_response,
    "model_metadata_response": build_model_metadata_response,
    "model_status_response": build_model_status_response,
}


@pytest.mark.parametrize("message_name", BUILDERS)
def test_messages_round_trip_both_ways(message_name):
    our_message, their_message = BUILDERS[message_name](OURS), BUILDERS[message_name](REAL)
    assert type(their_message).FromString(our_message.SerializeToString()) == their_message
    assert type(our_message).FromString(their_message.SerializeToString()) == our_message
    assert our_message.SerializeToString(deterministic=True) == their_message.SerializeToString(deterministic=True)
    # Text format names every field, so equal text means equal field names too. An Any needs our pool.
    assert text_format.MessageToString(our_message, descriptor_pool=POOL) == text_format.MessageToString(their_message)


def test_signature_def_map_unpacks_from_any_on_both_sides():
    our_response = OURS.metadata.GetModelMetadataResponse.FromString(
        build_model_metadata_response(REAL).SerializeToString()
    )
    their_response = REAL.metadata.GetModelMetadataResponse.FromString(
        build_model_metadata_response(OURS).SerializeToString()
    )
    for response, modules in ((our_response, OURS), (their_response, REAL)):
        signature_def_map = modules.metadata.SignatureDefMap()
        assert response.metadata["signature_def"].Unpack(signature_def_map)
        assert signature_def_map == build_signature_def_map(modules)
    # The JSON form of a message that holds an Any matches TF's once our pool is passed in.
    assert json_format.MessageToDict(our_response, descriptor_pool=POOL) == json_format.MessageToDict(their_response)


ARRAYS = {
    "float32": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32),
    "float32_special": np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45], np.float32),
    "float32_scalar": np.float32(3.5),
    "float32_empty": np.zeros((0, 3), np.float32),
    "float16": np.array([[0.5, -2.0], [65504.0, 6e-8]], np.float16),
    "float16_scalar": np.float16(-1.5),
    "int64": np.array([[-(2**63), 2**63 - 1], [0, 5]], np.int64),
    "int64_scalar": np.int64(-7),
    "int64_empty": np.zeros((2, 0), np.int64),
    "uint8_images": np.random.default_rng(1).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8),
    "uint8_scalar": np.uint8(255),
    "bool": np.array([True, False, True]),
    "bool_scalar": np.bool_(True),
    "string": np.array([[b"a", b"bc"], [b"\x00\xff\x00", "é".encode()]], dtype=object),
    "string_scalar": np.array(b"hello", dtype=object),
}


def assert_same_array(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape)
    np.testing.assert_array_equal(actual, expected)
    if actual.dtype != object:  # Equal bytes also tell -0.0 from 0.0 and keep NaN payloads.
        assert actual.tobytes() == expected.tobytes()


@pytest.mark.parametrize("array_name", ARRAYS)
def test_to_ndarray_reads_tensors_written_by_tensorflow(array_name):
    array = ARRAYS[array_name]
    # Both TF's Python encoder and its C++ encoder, which writes TF Serving's responses.
    cpp_encoded = REAL.tensor.TensorProto.FromString(tf.io.serialize_tensor(tf.constant(array)).numpy())
    for their_tensor in (tf.make_tensor_proto(array), cpp_encoded):
        our_tensor = OURS.tensor.TensorProto.FromString(their_tensor.SerializeToString())
        assert_same_array(tensors.to_ndarray(our_tensor), array)


@pytest.mark.parametrize("use_tensor_content", [True, False], ids=["tensor_content", "typed_fields"])
@pytest.mark.parametrize("array_name", ARRAYS)
def test_tensorflow_reads_tensors_written_by_to_tensor_proto(array_name, use_tensor_content):
    array = ARRAYS[array_name]
    our_tensor = tensors.to_tensor_proto(array, use_tensor_content=use_tensor_content)
    assert_same_array(tf.make_ndarray(REAL.tensor.TensorProto.FromString(our_tensor.SerializeToString())), array)


@pytest.mark.parametrize("ours_first", [True, False], ids=["ours_first", "tensorflow_first"])
def test_both_import_orders_work_in_one_process(ours_first):
    # A fresh interpreter is needed, because this process has already imported both sets of modules.
    imports = ["cnnkit_client.protos.tfs.predict_pb2", "tensorflow_serving.apis.predict_pb2"]
    code = "".join(f"import {module}\n" for module in (imports if ours_first else imports[::-1])) + textwrap.dedent("""
        from google.protobuf import descriptor_pool
        from cnnkit_client.protos.tfs import predict_pb2 as ours
        from tensorflow_serving.apis import predict_pb2 as theirs
        assert ours.PredictRequest.DESCRIPTOR.full_name == theirs.PredictRequest.DESCRIPTOR.full_name
        assert theirs.DESCRIPTOR.pool is descriptor_pool.Default() is not ours.DESCRIPTOR.pool
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def make_servicers(modules):
    """Servicers on one side's generated base classes: Predict echoes its input, the others answer fixed messages."""

    class PredictionService(modules.prediction_service.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 (gRPC's method name)
            echo = {"echo": request.inputs["images"]}
            return modules.predict.PredictResponse(model_spec=request.model_spec, outputs=echo)

        def GetModelMetadata(self, request, context):  # noqa: N802
            assert list(request.metadata_field) == ["signature_def"]
            return build_model_metadata_response(modules)

    class ModelService(modules.model_service.ModelServiceServicer):
        def GetModelStatus(self, request, context):  # noqa: N802
            assert request.model_spec.version.value == 3
            return build_model_status_response(modules)

    return PredictionService(), ModelService()


@pytest.mark.parametrize(
    ("server_modules", "client_modules"), [(REAL, OURS), (OURS, REAL)], ids=["real_server", "our_server"]
)
def test_grpc_round_trip_between_our_and_the_real_generated_code(server_modules, client_modules):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_servicer, model_servicer = make_servicers(server_modules)
    server_modules.prediction_service.add_PredictionServiceServicer_to_server(prediction_servicer, server)
    server_modules.model_service.add_ModelServiceServicer_to_server(model_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            prediction_stub = client_modules.prediction_service.PredictionServiceStub(channel)
            request = build_predict_request(client_modules)
            response = prediction_stub.Predict(request, timeout=10)
            assert response.model_spec == request.model_spec
            assert tensors.to_ndarray(response.outputs["echo"]).tolist() == [[0, 1, 2], [3, 4, 5]]

            metadata_request = client_modules.metadata.GetModelMetadataRequest(
                model_spec=make_model_spec(client_modules), metadata_field=["signature_def"]
            )
            metadata = prediction_stub.GetModelMetadata(metadata_request, timeout=10)
            assert metadata == build_model_metadata_response(client_modules)

            model_stub = client_modules.model_service.ModelServiceStub(channel)
            status_request = client_modules.status.GetModelStatusRequest(model_spec=make_model_spec(client_modules))
            assert model_stub.GetModelStatus(status_request, timeout=10) == build_model_status_response(client_modules)
    finally:
        server.stop(None)
