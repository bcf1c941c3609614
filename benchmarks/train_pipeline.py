"""Training throughput: cnnkit's recipe pipeline against the course style, same model, same epoch.

The course style compiles with Keras defaults (which use XLA on the TensorFlow backend) and calls
``fit`` on whole float32 numpy arrays. The recipe pipeline is what ``cnnkit train`` runs: uint8
images in a tf.data pipeline (shuffle, batch, cast per batch, augmentation on the fly, prefetch),
the recipe's ``steps_per_execution`` and XLA only on GPUs. Both train the same freshly built model
for one epoch on the same images, after a short warm-up that absorbs graph tracing.

    python benchmarks/train_pipeline.py --recipe cifar10_bn_aug --images 6400

Prints images/s of each and the ratio (target: at least 1.5x), plus the input memory each holds.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _course_style(model, x, y, batch_size: int, warmup: int) -> float:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    images = x.astype("float32")  # The course converts the whole array up front.
    model.fit(images[:warmup], y[:warmup], batch_size=batch_size, epochs=1, verbose=0)
    started = time.perf_counter()
    model.fit(images, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=True)
    return len(x) / (time.perf_counter() - started)


def _recipe_style(model, x, y, config, augmentation: bool, warmup: int) -> float:
    from cnnkit.training.data import make_pipeline
    from cnnkit.training.train import build_augmentation, compile_model

    compile_model(model, config.optimizer, config.learning_rate,
                  steps_per_execution=config.steps_per_execution)
    layers = build_augmentation(config) if augmentation else None
    model.fit(make_pipeline(x[:warmup], y[:warmup], config.batch_size, augmentation=layers),
              epochs=1, verbose=0, shuffle=False)
    pipeline = make_pipeline(x, y, config.batch_size, shuffle=True, augmentation=layers,
                             seed=config.seed)
    started = time.perf_counter()
    model.fit(pipeline, epochs=1, verbose=0, shuffle=False)  # The pipeline shuffles.
    return len(x) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="cifar10_bn_aug")
    parser.add_argument("--images", type=int, default=6400, help="images in the timed epoch")
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings for each side")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)

    import keras

    from cnnkit.training.config import load_recipe
    from cnnkit.training.data import load_dataset
    from cnnkit.training.models import create_model

    config = load_recipe(args.recipe)
    dataset = load_dataset(config.dataset, args.data_dir, validation_size=config.validation_size,
                           image_size=config.image_size, channels=config.channels,
                           train_limit=args.images, seed=config.seed)
    x, y = dataset.x_train, dataset.y_train
    warmup = min(len(x), config.batch_size * max(8, config.steps_per_execution))

    def fresh_model():
        keras.utils.set_random_seed(config.seed)
        return create_model(config.model, input_shape=dataset.input_shape,
                            **{"num_classes": dataset.num_classes, **config.model_args})

    if dataset.num_classes == 2 and config.model_args.get("num_classes") == 1:
        raise SystemExit("This benchmark covers the softmax recipes (the course style uses sparse CE).")
    results: dict[str, float] = {"course": 0.0, "recipe": 0.0, "recipe+aug": 0.0}
    for _ in range(args.repeats):
        results["course"] = max(results["course"],
                                _course_style(fresh_model(), x, y, config.batch_size, warmup))
        results["recipe"] = max(results["recipe"],
                                _recipe_style(fresh_model(), x, y, config, False, warmup))
        if config.augmentation.enabled:
            results["recipe+aug"] = max(results["recipe+aug"],
                                        _recipe_style(fresh_model(), x, y, config, True, warmup))
    print(f"recipe {config.name}: model {config.model}, batch {config.batch_size}, "
          f"{len(x)} images of {dataset.input_shape}, best of {args.repeats}, {os.cpu_count()} CPUs")
    print(f"  course style (fit on float32 arrays) : {results['course']:8.1f} images/s")
    print(f"  recipe pipeline, no augmentation     : {results['recipe']:8.1f} images/s   "
          f"ratio {results['recipe'] / results['course']:.2f}x")
    if config.augmentation.enabled:
        print(f"  recipe pipeline with augmentation    : {results['recipe+aug']:8.1f} images/s   "
              f"ratio {results['recipe+aug'] / results['course']:.2f}x")
    full = len(dataset.x_train) if args.images is None else args.images
    print(f"  input held in memory for {full} images: course {x[:full].nbytes * 4 / 2**20:.1f} MiB "
          f"(float32), recipe {x[:full].nbytes / 2**20:.1f} MiB (uint8)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
