"""The service: one inference core (:mod:`cnnkit.serving.core`) under the HTTP front end
(:mod:`cnnkit.serving.http`, BentoML) and the gRPC front end (:mod:`cnnkit.serving.grpc`, TF
Serving's API). Nothing here imports TensorFlow or :mod:`cnnkit.training`; only the explanation
worker process (:mod:`cnnkit.serving.explain_worker`) loads TensorFlow."""
