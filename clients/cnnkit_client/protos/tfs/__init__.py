"""TF-Serving-compatible protos without TensorFlow (generated; see NOTES.md / regen.sh)."""
