# cnnkit service image for GPU hosts: HTTP (BentoML) on 3000, TF-Serving gRPC on 8500.
#
#   docker build -t cnnkit .
#   docker run --gpus all -p 3000:3000 -p 8500:8500 -v $PWD/model_repository:/models:ro cnnkit
#
# The model repository is mounted at /models (export with `cnnkit export RUN_DIR`). Set
# CNNKIT_API_KEY to require an API key. ONNX Runtime uses CUDAExecutionProvider when the
# container sees a GPU and falls back to the CPU otherwise.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BENTOML_DO_NOT_TRACK=True \
    TF_CPP_MIN_LOG_LEVEL=3 \
    CNNKIT_MODEL_REPOSITORY=/models \
    CNNKIT_HOST=0.0.0.0

RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common curl \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 cnnkit
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cnnkit ./cnnkit
COPY clients ./clients

# Inference runs on ONNX Runtime, here its GPU build; the serving process imports no TensorFlow
# (its gRPC messages are the SDK's copies of TF Serving's protos). TensorFlow stays installed for
# the explanation worker (Grad-CAM and filter patterns need its gradients). Settings come from
# CNNKIT_* variables or a mounted YAML file (CNNKIT_CONFIG=/config/serve.yaml); see README, Settings.
RUN python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/venv/bin/pip install --no-cache-dir ".[serving]" \
    && /opt/venv/bin/pip uninstall -y onnxruntime \
    && /opt/venv/bin/pip install --no-cache-dir onnxruntime-gpu==1.31.1

ENV PATH=/opt/venv/bin:$PATH
USER cnnkit
EXPOSE 3000 8500
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD curl -fs http://127.0.0.1:3000/readyz || exit 1
CMD ["cnnkit", "serve", "--host", "0.0.0.0", "--http-port", "3000", "--grpc-port", "8500"]
