#!/usr/bin/env bash
# Regenerate (from clients/) cnnkit_client/protos/tfs/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py from the .proto files.
set -euo pipefail
cd "$(dirname "$0")/.."  # the clients/ folder
TOOLS=.venv-tools
if [ ! -x "$TOOLS/bin/python" ]; then
  python3.11 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q "grpcio-tools==1.85.1"   # bundles protoc 35.1 -> gencode 7.35.1
fi
OUT=cnnkit_client/protos/tfs
rm -f "$OUT"/*_pb2.py "$OUT"/*_pb2.pyi "$OUT"/*_pb2_grpc.py
"$TOOLS/bin/python" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. "$OUT"/*.proto
# The grpc plugin writes an empty *_pb2_grpc.py for every file; keep only the two with services.
for f in "$OUT"/*_pb2_grpc.py; do
  case "$f" in */prediction_service_pb2_grpc.py|*/model_service_pb2_grpc.py) ;; *) rm "$f" ;; esac
done
# Register into our private descriptor pool instead of the default one (see _pool.py / NOTES.md).
for f in "$OUT"/*_pb2.py; do
  sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/from cnnkit_client.protos.tfs._pool import POOL as _POOL\nDESCRIPTOR = _POOL.AddSerializedFile(/' "$f"
  if [ "$(grep -c '^DESCRIPTOR = _POOL.AddSerializedFile(' "$f")" != 1 ] || grep -q '_descriptor_pool.Default()' "$f"; then
    echo "regen.sh: could not patch $f for the private pool (generated code changed?)" >&2; exit 1
  fi
done
echo "regenerated: $(ls "$OUT"/*_pb2.py | wc -l) _pb2 modules, $(ls "$OUT"/*_pb2_grpc.py | wc -l) _pb2_grpc modules"
