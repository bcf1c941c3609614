"""Evaluating a finished run on its test set, and the report pictures that go with it.

``evaluate_run(RUN_DIR)`` writes into ``RUN_DIR/evaluation/``::

    metrics.json        test loss and accuracy, per-class precision / recall / F1 / support,
                        the confusion matrix, and the course's figure for comparison
    confusion_matrix.png
    curves.png          loss and accuracy per epoch, training vs validation
    misclassified.png   a grid of misclassified test images, true and predicted labels
    summary.png         the run on one page: headline figures, curves, confusion matrix, and a
                        few misclassified images
    report.md           the same figures as a short Markdown page
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.io import atomic_save, atomic_write_json, atomic_write_text
from cnnkit.training.rundir import RunDir, load_run_model


def predict_probabilities(model, images: np.ndarray, batch_size: int = 256, *, flip: bool = False) -> np.ndarray:
    """Class probabilities (N, classes); a single sigmoid output becomes two columns.

    With ``flip`` each image's probabilities are averaged with those of its left-right mirror image
    (test-time augmentation).
    """
    from cnnkit.training import data as data_module

    pipeline = data_module.make_pipeline(images, np.zeros(len(images), np.int64), batch_size)
    outputs = np.asarray(model.predict(pipeline.map(lambda x, _: x), verbose=0), dtype=np.float64)
    if flip:
        mirrored = np.ascontiguousarray(images[:, :, ::-1])
        pipeline = data_module.make_pipeline(mirrored, np.zeros(len(images), np.int64), batch_size)
        outputs = (outputs + np.asarray(model.predict(pipeline.map(lambda x, _: x), verbose=0),
                                        dtype=np.float64)) / 2.0
    if outputs.shape[-1] == 1:
        outputs = np.concatenate([1.0 - outputs, outputs], axis=-1)
    return outputs


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predictions.astype(np.int64)), 1)
    return matrix


def per_class_metrics(matrix: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows: true)."""
    rows = []
    for index, name in enumerate(class_names):
        true_positive = float(matrix[index, index])
        predicted = float(matrix[:, index].sum())
        actual = float(matrix[index, :].sum())
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({
            "class": name, "precision": round(precision, 4), "recall": round(recall, 4),
            "f1": round(f1, 4), "support": int(actual),
        })
    return rows


def cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    chosen = probabilities[np.arange(len(labels)), labels.astype(np.int64)]
    return float(-np.mean(np.log(np.clip(chosen, 1e-7, 1.0))))


def read_history(path: Path) -> dict[str, list[float]]:
    if not path.exists():
        return {}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    history: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key is None or value in (None, ""):
                continue
            history.setdefault(key, []).append(float(value))
    return history


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path, **options: Any) -> None:
    atomic_save(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png", **options))
    _pyplot().close(figure)


def _draw_curves(axes, history: dict[str, list[float]]) -> None:
    """Loss and accuracy per epoch, training vs validation, on two axes."""
    epochs = [int(epoch) + 1 for epoch in history.get("epoch", [])]
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix, label in (("", "training"), ("val_", "validation")):
            values = history.get(prefix + metric)
            if values:
                axis.plot(epochs[: len(values)] or range(1, len(values) + 1), values, marker="o",
                          markersize=3, label=label)
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        axis.legend()


def _draw_confusion_matrix(figure, axis, matrix: np.ndarray, class_names: list[str], fontsize: float = 8) -> None:
    image = axis.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axis, fraction=0.046)
    ticks = range(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=45, ha="right")
    axis.set_yticks(ticks, class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for row in range(matrix.shape[0]):
        for column in range(matrix.shape[1]):
            axis.text(column, row, str(matrix[row, column]), ha="center", va="center", fontsize=fontsize,
                      color="white" if matrix[row, column] > threshold else "black")


def _draw_misclassified(axes, images: np.ndarray, true_names: list[str], predicted_names: list[str],
                        probabilities: list[float]) -> None:
    for axis in axes:
        axis.axis("off")
    for axis, image, true, predicted, probability in zip(axes, images, true_names, predicted_names,
                                                         probabilities, strict=False):
        pixels = np.asarray(image)
        axis.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=255)
        axis.set_title(f"true: {true}\npred: {predicted} ({probability:.2f})", fontsize=8, color="firebrick")
    if len(images) == 0 and len(axes):
        axes[0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")


def plot_curves(history: dict[str, list[float]], path: Path, title: str) -> None:
    figure, axes = _pyplot().subplots(1, 2, figsize=(11, 4))
    _draw_curves(axes, history)
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def plot_misclassified(images: np.ndarray, true_names: list[str], predicted_names: list[str],
                       probabilities: list[float], path: Path, title: str, columns: int = 8) -> None:
    """Misclassified images in a grid, each captioned with its true class, the predicted class and
    that prediction's probability, in a real font (names of any length stay readable)."""
    count = len(images)
    columns = max(1, min(columns, count))
    rows = max(1, -(-count // columns))
    figure, axes = _pyplot().subplots(rows, columns, figsize=(1.9 * columns, 2.25 * rows + 0.5), squeeze=False)
    _draw_misclassified(list(axes.ravel()), images, true_names, predicted_names, probabilities)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    _save(figure, path)


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    size = max(5.0, 0.6 * len(class_names) + 2)
    figure, axis = _pyplot().subplots(figsize=(size + 1, size))
    _draw_confusion_matrix(figure, axis, matrix, class_names)
    axis.set_title(title)
    figure.tight_layout()
    _save(figure, path)


def plot_summary(metrics: dict[str, Any], history: dict[str, list[float]], misclassified: tuple, path: Path,
                 shown: int = 8) -> None:
    """The run on one page: headline figures, curves, confusion matrix and a few misclassified images.

    ``misclassified`` is (images, true names, predicted names, probabilities), as for
    :func:`plot_misclassified`; the first ``shown`` are drawn.
    """
    plt = _pyplot()
    classes = len(metrics["class_names"])
    figure = plt.figure(figsize=(18, 10.5))
    grid = figure.add_gridspec(3, shown, height_ratios=[0.35, 3.2, 1.6], hspace=0.55, wspace=0.35)
    # Headline: what was trained, how well, against the course, and the weakest classes.
    head = figure.add_subplot(grid[0, :])
    head.axis("off")
    accuracy = metrics["test_accuracy"] * 100
    course = metrics.get("course_accuracy")
    weakest = sorted(metrics["per_class"], key=lambda row: row["recall"])[: min(3, classes)]
    seconds = metrics.get("train_seconds")
    lines = [
        f"{metrics['recipe']} ({metrics['model']}, {metrics['parameters']:,} parameters): test accuracy "
        f"{accuracy:.2f}% on {metrics['test_images']:,} images"
        + (f"  (the course: {course * 100:.1f}%)" if course else ""),
        f"epochs trained {metrics.get('epochs_trained')}, best epoch {metrics.get('best_epoch')}"
        + (f", {seconds / 60:.1f} min of training" if seconds else "")
        + "  ·  lowest recall: " + ", ".join(f"{row['class']} {row['recall'] * 100:.1f}%" for row in weakest),
    ]
    head.text(0.0, 1.0, lines[0], fontsize=15, weight="bold", va="top", transform=head.transAxes)
    head.text(0.0, 0.1, lines[1], fontsize=11, va="top", transform=head.transAxes)
    middle = grid[1, :].subgridspec(1, 3, width_ratios=[1, 1, 1.15], wspace=0.3)
    if history:
        _draw_curves([figure.add_subplot(middle[0, 0]), figure.add_subplot(middle[0, 1])], history)
    else:
        empty = figure.add_subplot(middle[0, :2])
        empty.axis("off")
        empty.text(0.5, 0.5, "no training history", ha="center", va="center")
    confusion = figure.add_subplot(middle[0, 2])
    _draw_confusion_matrix(figure, confusion, np.asarray(metrics["confusion_matrix"]), metrics["class_names"],
                           fontsize=8 if classes <= 10 else 6)
    confusion.set_title("confusion matrix (test)")
    images, true_names, predicted_names, probabilities = misclassified
    axes = [figure.add_subplot(grid[2, column]) for column in range(shown)]
    _draw_misclassified(axes, images[:shown], true_names[:shown], predicted_names[:shown], probabilities[:shown])
    figure.text(0.5, 0.31, f"misclassified test images (the first {min(shown, len(images))})", ha="center",
                fontsize=11)
    _save(figure, path, bbox_inches="tight", pad_inches=0.3)


def _markdown_report(metrics: dict[str, Any]) -> str:
    lines = [
        f"# {metrics['recipe']} — evaluation",
        "",
        f"- data set: {metrics['dataset']} ({metrics['test_images']} test images)",
        f"- test accuracy: **{metrics['test_accuracy'] * 100:.2f}%**, test loss {metrics['test_loss']:.4f}",
    ]
    if metrics.get("course_accuracy") is not None:
        lines.append(f"- the course reached: {metrics['course_accuracy'] * 100:.1f}%")
    lines += [
        f"- epochs trained: {metrics.get('epochs_trained')}, training time: "
        f"{metrics.get('train_seconds')} s",
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in metrics["per_class"]:
        lines.append(f"| {row['class']} | {row['precision']:.4f} | {row['recall']:.4f} | "
                     f"{row['f1']:.4f} | {row['support']} |")
    lines += ["", "![summary](summary.png)", "", "![curves](curves.png)", "",
              "![confusion matrix](confusion_matrix.png)", "", "![misclassified](misclassified.png)", ""]
    return "\n".join(lines)


def evaluate_run(
    run_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    dataset=None,
    model=None,
    max_misclassified: int = 32,
    test_time_flip: bool | None = None,
) -> dict[str, Any]:
    """Evaluate the run's final model on its test set and write the evaluation artefacts.

    ``test_time_flip`` overrides the recipe's setting of the same name for this evaluation.
    """
    from cnnkit.training.data import load_recipe_dataset

    run = RunDir(run_dir).require_run()
    config = run.load_config()
    if model is None:
        model = load_run_model(run.require_model())
    if dataset is None:
        dataset = load_recipe_dataset(config, data_dir)
    flip = config.test_time_flip if test_time_flip is None else test_time_flip
    probabilities = predict_probabilities(model, dataset.x_test, flip=flip)
    predictions = probabilities.argmax(axis=1)
    labels = dataset.y_test
    matrix = confusion_matrix(labels, predictions, dataset.num_classes)
    state = run.read_state()
    metrics: dict[str, Any] = {
        "recipe": config.name,
        "model": config.model,
        "dataset": config.dataset,
        "class_names": dataset.class_names,
        "test_images": int(len(labels)),
        "test_accuracy": round(float((predictions == labels).mean()), 6),
        "test_loss": round(cross_entropy(probabilities, labels), 6),
        "test_time_flip": bool(flip),
        "course_accuracy": config.course_accuracy,
        "epochs_trained": state.get("epoch"),
        "best_epoch": state.get("best_epoch"),
        "stopped_early_at": state.get("stopped_early_at"),
        "train_seconds": state.get("train_seconds"),
        "parameters": int(model.count_params()),
        "per_class": per_class_metrics(matrix, dataset.class_names),
        "confusion_matrix": matrix.tolist(),
    }
    output = run.evaluation
    output.mkdir(exist_ok=True)
    title = f"{config.name}: test accuracy {metrics['test_accuracy'] * 100:.2f}%" + (" (flip TTA)" if flip else "")
    plot_confusion_matrix(matrix, dataset.class_names, output / "confusion_matrix.png", title)
    history = read_history(run.history)
    if history:
        plot_curves(history, output / "curves.png", config.name)
    wrong = np.flatnonzero(predictions != labels)[:max_misclassified]
    misclassified = (dataset.x_test[wrong], [dataset.class_names[labels[i]] for i in wrong],
                     [dataset.class_names[predictions[i]] for i in wrong],
                     [float(probabilities[i, predictions[i]]) for i in wrong])
    plot_misclassified(*misclassified, output / "misclassified.png",
                       f"{config.name}: misclassified test images (first {len(wrong)})")
    plot_summary(metrics, history, misclassified, output / "summary.png")
    atomic_write_json(run.metrics, metrics)
    atomic_write_text(output / "report.md", _markdown_report(metrics))
    accuracy = metrics["test_accuracy"]
    print(
        f"[cnnkit] {config.name}: test accuracy {accuracy * 100:.2f}%  test loss "
        f"{metrics['test_loss']:.4f}{'  (test-time flip)' if flip else ''}  ({output})",
        file=sys.stderr,
    )
    if not math.isfinite(metrics["test_loss"]):
        print("[cnnkit] warning: the test loss is not finite", file=sys.stderr)
    return metrics
