"""The Open Inference Protocol's (KServe / Triton "v2") gRPC messages (generated; see regen.sh)."""
