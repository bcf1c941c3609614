"""Private descriptor pool for the Open Inference Protocol messages.

tritonclient registers the same messages (package ``inference``) in protobuf's default pool; a
process that imports both (the conformance tests, an app moving from Triton) would fail with
"duplicate symbol" if ours went there too. Same full names, same wire format, separate pool.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
