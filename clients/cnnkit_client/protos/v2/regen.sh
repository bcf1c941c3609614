#!/usr/bin/env bash
# Regenerate the Open Inference Protocol messages from the two .proto files here.
# Needs grpcio-tools matching the pinned protobuf (not a project dependency):
#   pip install --no-deps --target /tmp/grpc-tools grpcio-tools==1.85.1
#   GRPC_TOOLS=/tmp/grpc-tools clients/cnnkit_client/protos/v2/regen.sh
# The generated files register their descriptors in this package's own pool (_pool.POOL), not in
# protobuf's default pool, where tritonclient registers the same message names.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PYTHONPATH="${GRPC_TOOLS:?set GRPC_TOOLS to where grpcio-tools is installed}" "${PYTHON:-python}" -m grpc_tools.protoc \
    -I. --python_out=. --pyi_out=. --grpc_python_out=. \
    cnnkit_client/protos/v2/model_config.proto cnnkit_client/protos/v2/grpc_service.proto
rm -f cnnkit_client/protos/v2/model_config_pb2_grpc.py
for file in cnnkit_client/protos/v2/*_pb2.py; do
    sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/from cnnkit_client.protos.v2._pool import POOL\nDESCRIPTOR = POOL.AddSerializedFile(/' "$file"
done
