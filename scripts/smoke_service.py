"""Call a running cnnkit service over HTTP and gRPC with real test images, and check the answers.

    python scripts/smoke_service.py --model digits [--http http://127.0.0.1:3000] [--grpc 127.0.0.1:8500]

Sends MNIST test digits (from the data root) three ways over HTTP (file upload, base64 JSON,
TF-Serving REST) and as a batch over gRPC with a stock TF-Serving client, prints what came back
and exits with status 1 if the answers disagree or the accuracy is at chance level.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time

from cnnkit.tensorflow_logs import quiet_tensorflow

quiet_tensorflow()  # the stock TF-Serving client below imports TensorFlow; its start-up lines are noise here


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--http", default="http://127.0.0.1:3000")
    parser.add_argument("--grpc", default="127.0.0.1:8500")
    parser.add_argument("--images", type=int, default=200, help="test digits sent over gRPC")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--save-images", metavar="DIR", help="also write the test digits as PNGs into DIR/LABEL/")
    args = parser.parse_args(argv)

    import httpx
    import numpy as np
    from PIL import Image

    from cnnkit.training.data import load_dataset

    dataset = load_dataset("mnist", args.data_dir, validation_size=10, test_limit=args.images)
    images, labels = dataset.x_test, dataset.y_test
    buffer = io.BytesIO()
    Image.fromarray(images[0][..., 0]).save(buffer, format="PNG")
    png = buffer.getvalue()

    problems: list[str] = []
    with httpx.Client(base_url=args.http, timeout=60) as client:
        started = time.perf_counter()
        upload = client.post("/predict", files={"image": ("digit.png", png, "image/png")},
                             data={"model": args.model, "top_k": "3"})
        upload.raise_for_status()
        top = upload.json()["predictions"][0]
        print(f"HTTP  /predict (upload)   true {labels[0]}  ->  " +
              ", ".join(f"{entry['class']} {entry['probability']:.3f}" for entry in top) +
              f"   [{(time.perf_counter() - started) * 1000:.0f} ms]")
        as_json = client.post("/predict_json", json={"model": args.model, "images": [base64.b64encode(png).decode()]})
        as_json.raise_for_status()
        rest = client.post(f"/v1/models/{args.model}:predict", json={"instances": images[:1].tolist()})
        rest.raise_for_status()
        json_top = as_json.json()["predictions"][0][0]["class"]
        rest_top = dataset.class_names[rest.json()["predictions"][0]["top_class"]]
        print(f"HTTP  /predict_json        ->  {json_top}      TF-Serving REST :predict  ->  {rest_top}")
        if not top[0]["class"] == json_top == rest_top:
            problems.append("the three HTTP routes disagree")

    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = args.model
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(images[:64]))
    with grpc.insecure_channel(args.grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        predicted = []
        started = time.perf_counter()
        for start in range(0, len(images), 64):
            request.inputs["image"].CopyFrom(tf.make_tensor_proto(images[start:start + 64]))
            response = stub.Predict(request, timeout=60)
            predicted.append(tf.make_ndarray(response.outputs["top_class"]))
        elapsed = time.perf_counter() - started
    accuracy = float((np.concatenate(predicted) == labels).mean())
    print(f"gRPC  Predict (TF Serving) {len(images)} test digits: accuracy {accuracy * 100:.1f}%  "
          f"({len(images) / elapsed:.0f} images/s), model {response.model_spec.name} "
          f"version {response.model_spec.version.value}")
    if accuracy < 0.5:
        problems.append(f"gRPC accuracy {accuracy:.2f} is near chance")

    # The Python SDK (cnnkit_client), as an app would call the service: both protocols must agree.
    from cnnkit_client import Client, GrpcClient

    with Client(args.http) as http_client, GrpcClient(args.grpc) as grpc_client:
        over_http = http_client.predict(list(images[:32]), model=args.model, top_k=1)
        over_grpc = grpc_client.predict(list(images[:32]), model=args.model, top_k=1)
        maps = grpc_client.feature_maps(images[0], model=args.model)
    sdk_accuracy = float(np.mean([p.label == dataset.class_names[y] for p, y in zip(over_http, labels, strict=False)]))
    print(f"SDK   Client + GrpcClient  32 digits: accuracy {sdk_accuracy * 100:.1f}%, protocols agree: "
          f"{[p.label for p in over_http] == [p.label for p in over_grpc]}; feature maps "
          + ", ".join(f"{name} {value.shape}" for name, value in maps.items()))
    if [p.label for p in over_http] != [p.label for p in over_grpc]:
        problems.append("the SDK's HTTP and gRPC answers disagree")

    # The Open Inference Protocol (KServe / Triton v2) on the same ports, through the SDK.
    with Client(args.http, protocol="v2") as v2_http, GrpcClient(args.grpc, protocol="v2") as v2_grpc:
        v2_over_http = v2_http.predict(list(images[:32]), model=args.model, top_k=1)
        v2_over_grpc = v2_grpc.predict(list(images[:32]), model=args.model, top_k=1)
    v2_labels = [p.label for p in v2_over_http]
    print(f"v2    HTTP /v2/.../infer + gRPC ModelInfer 32 digits: agree with the SDK's answers: "
          f"{v2_labels == [p.label for p in over_http] == [p.label for p in v2_over_grpc]}")
    if not v2_labels == [p.label for p in over_http] == [p.label for p in v2_over_grpc]:
        problems.append("the Open Inference Protocol's answers disagree with the others")

    # Seeing inside: Grad-CAM of the first digit over HTTP, filter patterns over gRPC.
    with Client(args.http) as http_client, GrpcClient(args.grpc) as grpc_client:
        heat = http_client.gradcam(images[0], model=args.model)
        patterns = grpc_client.filter_patterns(model=args.model, filters=16)
    peak = tuple(int(index) for index in np.unravel_index(heat.heatmap.argmax(), heat.heatmap.shape))
    print(f"SDK   gradcam: class {heat.class_name} (p={heat.probability:.3f}) at {heat.layer}, heatmap "
          f"{heat.heatmap.shape} peak at {peak}; "
          f"filter_patterns: {patterns.layer} {len(patterns.filters)} filters, {len(patterns.dead)} dead")
    if heat.class_name != over_http[0].label:
        problems.append("Grad-CAM explained another class than the predicted one")
    if args.save_images:
        from pathlib import Path

        Path(args.save_images).mkdir(parents=True, exist_ok=True)
        (Path(args.save_images).parent / "main-gradcam.png").write_bytes(heat.overlay_png)
        (Path(args.save_images).parent / "main-filter-patterns.png").write_bytes(patterns.grid_png)
    if args.save_images:
        from pathlib import Path

        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = Path(args.save_images) / dataset.class_names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[..., 0]).save(folder / f"test{index:05d}.png")
    for problem in problems:
        print(f"smoke test failed: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
