"""gRPC: a stock TF-Serving client (tensorflow_serving.apis only) against our server on 127.0.0.1."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def grpc_server(digits_repository):
    from cnnkit.serving.core import InferenceCore
    from cnnkit.serving.grpc.server import build_server
    from cnnkit.serving.model_store import ModelStore

    store = ModelStore(digits_repository, threads=1)
    core = InferenceCore(store)
    server = build_server(core, port=0)
    server.start()
    store.refresh()
    server.set_serving(True)
    yield f"127.0.0.1:{server.port}", store
    server.stop(grace=None)
    core.close()


@pytest.fixture(scope="module")
def channel(grpc_server):
    with grpc.insecure_channel(grpc_server[0]) as opened:
        yield opened


@pytest.fixture(scope="module")
def digits(data_root):
    from cnnkit.training.data import load_dataset

    dataset = load_dataset("mnist", data_root, validation_size=10, test_limit=16)
    return dataset.x_test, dataset.y_test


def predict_request(images, signature="serving_default", version=None, output_filter=()):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(images))
    request.output_filter.extend(output_filter)
    return request


def test_stock_client_predicts_with_uint8_and_float_pixels(channel, digits, tiny_digits_run):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    images, labels = digits
    for batch in (images, images.astype(np.float32)):
        response = stub.Predict(predict_request(batch), timeout=30)
        probabilities = tf.make_ndarray(response.outputs["probabilities"])
        top = tf.make_ndarray(response.outputs["top_class"])
        assert probabilities.shape == (16, 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
        np.testing.assert_array_equal(top, probabilities.argmax(axis=1))
        assert (top == labels).mean() > 0.5
        assert response.model_spec.name == "digits" and response.model_spec.version.value == 1
    # The same numbers as the trained Keras model.
    import keras

    expected = keras.models.load_model(tiny_digits_run / "model.keras").predict(
        images.astype(np.float32), verbose=0)
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)


def test_feature_maps_signature_with_output_filter(channel, digits):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = stub.Predict(predict_request(digits[0][:2], "feature_maps", output_filter=["conv1"]),
                            timeout=30)
    assert list(response.outputs) == ["conv1"]
    assert tf.make_ndarray(response.outputs["conv1"]).shape == (2, 28, 28, 6)
    everything = stub.Predict(predict_request(digits[0][:1], "feature_maps"), timeout=30)
    assert set(everything.outputs) == {"conv1", "pool1", "conv2", "pool2", "conv3"}
    only_top = stub.Predict(predict_request(digits[0][:3], output_filter=["top_class"]), timeout=30)
    assert list(only_top.outputs) == ["top_class"]


def test_encoded_images_as_a_string_tensor(channel, digits):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    encoded = []
    for image in digits[0][:3]:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0]).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    from_bytes = stub.Predict(predict_request(np.array(encoded, dtype=object)), timeout=30)
    from_pixels = stub.Predict(predict_request(digits[0][:3]), timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(from_bytes.outputs["probabilities"]),
                               tf.make_ndarray(from_pixels.outputs["probabilities"]), atol=1e-6)


def test_classify_with_tf_examples(channel, digits):
    import tensorflow as tf
    from tensorflow_serving.apis import classification_pb2, prediction_service_pb2_grpc

    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "digits"
    for image in digits[0][:2]:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0]).save(buffer, format="PNG")
        example = request.input.example_list.examples.add()
        example.features.feature["image/encoded"].bytes_list.value.append(buffer.getvalue())
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Classify(request, timeout=30)
    assert len(response.result.classifications) == 2
    first = response.result.classifications[0].classes
    assert len(first) == 10 and first[0].score >= first[1].score
    assert {entry.label for entry in first} == {str(digit) for digit in range(10)}
    assert isinstance(tf, object)


def test_model_metadata_and_status(channel):
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        prediction_service_pb2_grpc,
    )

    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "digits"
    request.metadata_field.append("signature_def")
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    serving = signatures.signature_def["serving_default"]
    assert list(serving.inputs) == ["image"]
    assert [dim.size for dim in serving.inputs["image"].tensor_shape.dim] == [-1, 28, 28, 1]
    assert set(serving.outputs) == {"probabilities", "top_class"}
    assert "conv3" in signatures.signature_def["feature_maps"].outputs

    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "digits"
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request, timeout=30)
    assert [(entry.version, entry.state) for entry in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]


def test_health_reports_serving(channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tensorflow.serving.PredictionService"):
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        (lambda r: setattr(r.model_spec, "name", "nope"), grpc.StatusCode.NOT_FOUND,
         "Servable not found for request: Latest(nope)"),
        (lambda r: r.model_spec.version.__setattr__("value", 9), grpc.StatusCode.NOT_FOUND,
         "Specific(digits, 9)"),
        (lambda r: setattr(r.model_spec, "signature_name", "explain"), grpc.StatusCode.INVALID_ARGUMENT,
         'Serving signature name: "explain" not found'),
        (lambda r: r.output_filter.append("logits"), grpc.StatusCode.INVALID_ARGUMENT,
         "output tensor alias not found in signature: logits"),
        (lambda r: r.inputs["pixels"].CopyFrom(r.inputs.pop("image")), grpc.StatusCode.INVALID_ARGUMENT,
         "input tensor alias not found in signature: pixels"),
    ],
)
def test_tf_serving_status_codes(channel, digits, change, code, message):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    request = predict_request(digits[0][:1])
    change(request)
    with pytest.raises(grpc.RpcError) as raised:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert raised.value.code() == code
    assert message in raised.value.details()


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((1, 28, 28, 3), np.float32), r"must have shape (28, 28, 1)"),
        (np.zeros((28,), np.float32), "must have shape (batch, 28, 28, 1)"),
        (np.full((1, 28, 28, 1), np.nan, np.float32), "NaN or infinite"),
        (np.zeros((65, 28, 28, 1), np.uint8), "65 images in one request; the limit is 64"),
        (np.array([b"not an image"], dtype=object), "not an image"),
        (np.array([True]), "real pixel values"),
    ],
)
def test_bad_tensors_are_invalid_argument_and_the_server_keeps_serving(channel, digits, images, message):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(predict_request(images), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()
    assert stub.Predict(predict_request(digits[0][:1]), timeout=30).outputs["top_class"]


def test_messages_over_grpcs_four_megabyte_default_are_accepted(channel):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    noise = np.random.default_rng(0).integers(0, 255, (1100, 1100, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG", compress_level=0)
    request = predict_request(np.array([buffer.getvalue()] * 2, dtype=object))
    assert request.ByteSize() > 6 * 1024 * 1024
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    assert tf.make_ndarray(response.outputs["probabilities"]).shape == (2, 10)


def test_api_key_guards_everything_but_health(digits_repository, digits):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from cnnkit.serving.core import InferenceCore
    from cnnkit.serving.grpc.server import build_server
    from cnnkit.serving.model_store import ModelStore

    store = ModelStore(digits_repository, threads=1)
    server = build_server(InferenceCore(store), port=0, api_key="s3cret")
    server.start()
    store.refresh()
    server.set_serving(True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as opened:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(opened)
            with pytest.raises(grpc.RpcError) as raised:
                stub.Predict(predict_request(digits[0][:1]), timeout=30)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError):
                stub.Predict(predict_request(digits[0][:1]), metadata=[("x-api-key", "wrong")], timeout=30)
            assert stub.Predict(predict_request(digits[0][:1]), metadata=[("x-api-key", "s3cret")],
                                timeout=30).outputs["probabilities"]
            assert stub.Predict(predict_request(digits[0][:1]),
                                metadata=[("authorization", "Bearer s3cret")], timeout=30)
            answer = health_pb2_grpc.HealthStub(opened).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            # The Open Inference Protocol's service: the same key, its health checks open.
            from cnnkit_client.protos.v2 import grpc_service_pb2 as v2
            from cnnkit_client.protos.v2 import grpc_service_pb2_grpc as v2_grpc

            inference = v2_grpc.GRPCInferenceServiceStub(opened)
            assert inference.ServerReady(v2.ServerReadyRequest(), timeout=10).ready
            with pytest.raises(grpc.RpcError) as refused:
                inference.ModelMetadata(v2.ModelMetadataRequest(name="digits"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert inference.ModelMetadata(v2.ModelMetadataRequest(name="digits"), timeout=10,
                                           metadata=[("x-api-key", "s3cret")]).name == "digits"
    finally:
        server.stop(grace=None)


def test_concurrent_grpc_predictions_share_batches_and_get_their_own_rows(digits_repository, digits):
    """Calls that arrive while a batch runs join the next one, on the server's event loop."""
    from concurrent.futures import ThreadPoolExecutor

    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from cnnkit.serving.core import InferenceCore
    from cnnkit.serving.grpc.server import build_server
    from cnnkit.serving.model_store import ModelStore

    store = ModelStore(digits_repository)
    store.refresh()
    model = store.get("digits")
    # Batches in threads only: a lone call for this quick model would otherwise run in the loop at
    # once, and on a loaded machine every call may find itself alone.
    core = InferenceCore(store, inline_batch_ms=0)
    server = build_server(core, port=0, max_workers=2)  # inference does not use the thread pool
    server.start()
    images = digits[0][:8].astype(np.float32)
    expected = model.predict(images)
    requests = [predict_request(images[index][None]) for index in range(8)]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as opened:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(opened)
            with ThreadPoolExecutor(32) as pool:
                answers = list(pool.map(lambda index: (index, tf.make_ndarray(
                    stub.Predict(requests[index % 8], timeout=60).outputs["probabilities"])), range(320)))
        stats = [batchers.get(model).stats for batchers in core._loops.values()]
    finally:
        server.stop(grace=None)
        core.close()
    for index, probabilities in answers:
        np.testing.assert_allclose(probabilities[0], expected[index % 8], rtol=1e-5, atol=1e-6)
    assert len(stats) == 1  # the gRPC server's loop
    assert stats[0].images == 320 and stats[0].batches < 320  # calls were merged, 32 at a time at most


@pytest.mark.parametrize("value", [
    np.array([[0.1, 0.9]], dtype=np.float32),
    np.arange(6, dtype=np.int64),
    np.zeros((2, 3, 3, 4), dtype=np.float16),
    np.array([7], dtype=np.int64),
])
def test_response_tensors_read_back_as_tf_make_tensor_proto_writes_them(value):
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    from cnnkit.serving.grpc.server import fill_tensor_proto
    from cnnkit_client.protos.tfs import tensor_pb2 as vendored

    written = vendored.TensorProto()
    fill_tensor_proto(written, value)
    # What goes over the wire, as a stock client's TensorFlow reads it.
    ours = tensor_pb2.TensorProto.FromString(written.SerializeToString())
    reference = tf.make_tensor_proto(value)
    assert ours.dtype == reference.dtype
    assert ours.tensor_shape == reference.tensor_shape
    read = tf.make_ndarray(ours)
    assert read.dtype == value.dtype
    np.testing.assert_array_equal(read, value)


def test_a_server_on_its_own_core_answers_predict_and_classify(digits_repository, digits):
    """A server built on a fresh core (batchers made on the first call) answers both methods."""
    import tensorflow as tf
    from tensorflow_serving.apis import classification_pb2, prediction_service_pb2_grpc

    from cnnkit.serving.core import InferenceCore
    from cnnkit.serving.grpc.server import build_server
    from cnnkit.serving.model_store import ModelStore

    store = ModelStore(digits_repository, threads=1)
    store.refresh()
    server = build_server(InferenceCore(store), port=0)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as opened:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(opened)
            response = stub.Predict(predict_request(digits[0][:4]), timeout=30)
            probabilities = tf.make_ndarray(response.outputs["probabilities"])
            np.testing.assert_allclose(probabilities, store.get("digits").predict(digits[0][:4].astype(np.float32)),
                                       rtol=1e-5, atol=1e-6)
            request = classification_pb2.ClassificationRequest()
            request.model_spec.name = "digits"
            example = request.input.example_list.examples.add()
            example.features.feature["pixels"].float_list.value.extend(digits[0][0].astype(np.float32).ravel())
            classified = stub.Classify(request, timeout=30)
            assert len(classified.result.classifications[0].classes) == 10
    finally:
        server.stop(grace=None)
