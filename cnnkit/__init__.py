"""cnnkit: a training toolkit and model-serving microservice for image-classification CNNs.

The package is laid out in layers, each importing only from the layers beside or below it:

* ``cnnkit.cli`` on top: one sub-command per verb, the only module that reaches every side;
* ``cnnkit.training`` (recipes, data, models, training, evaluation, export) and ``cnnkit.serving``
  (inference core, HTTP and gRPC front ends), which never import each other;
* the shared layer below both: :mod:`cnnkit.errors`, :mod:`cnnkit.io` (atomic writes),
  :mod:`cnnkit.images` (pixels), :mod:`cnnkit.pictures`, :mod:`cnnkit.repository` (the model
  repository format and its typed metadata), :mod:`cnnkit.explain` (Grad-CAM and filter patterns on
  exported models), :mod:`cnnkit.bento` and :mod:`cnnkit.settings`.

The SDK (``cnnkit_client``) is a separate distribution that imports nothing from here.
"""

__version__ = "0.2.0"
