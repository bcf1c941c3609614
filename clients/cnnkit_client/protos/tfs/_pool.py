"""Private descriptor pool for the TF-Serving mirror protos.

Our .proto files use TF's own package names (tensorflow, tensorflow.serving) so that message
full names, Any type URLs and gRPC method paths are identical to TF Serving's. Registering them in
protobuf's *default* pool would clash with TensorFlow's own descriptors ("duplicate symbol
'tensorflow.TensorShapeProto'") whenever tensorflow / tensorflow_serving.apis is imported in the
same process, in either order. The generated *_pb2.py files are therefore patched (see
regen.sh) to add their files to this pool instead of descriptor_pool.Default().

The well-known types we depend on (Any, Int64Value) are added here too: a pool can only resolve
imports from itself, so our ModelSpec.version / metadata values are classes of *this* pool, not
google.protobuf.wrappers_pb2.Int64Value / any_pb2.Any (same wire format, same full name).
"""
from google.protobuf import any_pb2, descriptor_pool, wrappers_pb2

POOL = descriptor_pool.DescriptorPool()
for _dep in (any_pb2, wrappers_pb2):
    POOL.AddSerializedFile(_dep.DESCRIPTOR.serialized_pb)
