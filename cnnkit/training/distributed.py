"""Training on several machines: ``cnnkit train --distributed`` under ``MultiWorkerMirroredStrategy``.

Every worker runs the same command with the standard ``TF_CONFIG`` naming the cluster and its own
place in it (https://www.tensorflow.org/guide/distributed_training). The recipe's ``batch_size`` is
the global batch: each global batch is split between the workers (the pipeline is sharded by
data), the gradients are summed across them, and every worker ends each step with the same weights.

Keras 3's ``model.fit`` cannot run under this strategy (keras-team/keras#20585: it fails converting
the strategy's per-replica values), so the epochs run in :func:`fit_distributed`, a plain training
loop over the same model, optimizer and callbacks: checkpoints, early stopping, the history and the
progress line behave as in a one-machine run. Only the chief writes the run directory; the others
write their checkpoints into a folder of their own and read the chief's on ``--resume``, so a run
whose workers were killed resumes from its last completed epoch when they are all started again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from cnnkit.errors import RunError


@dataclass(frozen=True)
class ClusterPlace:
    """This worker's place in the cluster that TF_CONFIG describes."""

    task_type: str
    index: int
    workers: int

    @property
    def is_chief(self) -> bool:
        return self.task_type == "chief" or (self.task_type == "worker" and self.index == 0)


def cluster_place(environment: dict[str, str] | None = None) -> ClusterPlace:
    """Read TF_CONFIG; a clear RunError when it is missing or malformed."""
    text = (environment if environment is not None else os.environ).get("TF_CONFIG")
    if not text:
        raise RunError("--distributed needs TF_CONFIG: the cluster's workers and this one's place, e.g. "
                       '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", '
                       '"index": 0}}.')
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
        place = ClusterPlace(str(task["type"]), int(task["index"]), workers)
    except (ValueError, KeyError, TypeError) as error:
        raise RunError(f"TF_CONFIG is not a cluster description ({error}): {text[:200]}") from error
    if place.task_type not in ("worker", "chief") or workers < 1:
        raise RunError(f"TF_CONFIG names a task of type {place.task_type!r}; cnnkit runs workers (and a chief).")
    return place


def multi_worker_strategy():
    import tensorflow as tf

    communication = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=communication)


def _distribute(strategy, dataset):
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def fit_distributed(model, strategy, train_data, val_data, *, epochs: int, initial_epoch: int,
                    global_batch_size: int, callbacks: list, label_smoothing: float = 0.0) -> dict[str, Any]:
    """Train ``model`` (compiled: its optimizer is used) from ``initial_epoch`` to ``epochs`` with a
    training loop under ``strategy``, calling the Keras ``callbacks`` as ``fit`` would; returns the
    last epoch's logs (the same on every worker: the metrics are summed across them)."""
    import keras
    import tensorflow as tf

    binary = int(model.outputs[0].shape[-1]) == 1
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)

    def per_example_loss(labels, probabilities):
        if binary:
            labels = tf.cast(tf.reshape(labels, (-1, 1)), probabilities.dtype)
            return keras.losses.binary_crossentropy(labels, probabilities, label_smoothing=label_smoothing)
        if label_smoothing:
            onehot = tf.one_hot(tf.cast(tf.reshape(labels, (-1,)), tf.int32), tf.shape(probabilities)[-1],
                                dtype=probabilities.dtype)
            return keras.losses.categorical_crossentropy(onehot, probabilities, label_smoothing=label_smoothing)
        return keras.losses.sparse_categorical_crossentropy(labels, probabilities)

    def correct(labels, probabilities):
        if binary:
            predicted = tf.cast(probabilities[:, 0] > 0.5, tf.int64)
        else:
            predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
        return tf.reduce_sum(tf.cast(tf.equal(predicted, tf.cast(tf.reshape(labels, (-1,)), tf.int64)),
                                     tf.float32))

    def summed(values):
        return tuple(strategy.reduce("SUM", value, axis=None) for value in values)

    @tf.function
    def train_step(batch):
        def replica(images, labels):
            with tf.GradientTape() as tape:
                probabilities = tf.cast(model(images, training=True), tf.float32)
                losses = per_example_loss(labels, probabilities)
                loss = tf.nn.compute_average_loss(losses, global_batch_size=global_batch_size)
                if model.losses:  # L2 terms, once per global step across the replicas
                    loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            gradients = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
            return (tf.reduce_sum(losses), correct(labels, probabilities),
                    tf.cast(tf.shape(labels)[0], tf.float32))

        return summed(strategy.run(replica, args=batch))

    @tf.function
    def eval_step(batch):
        def replica(images, labels):
            probabilities = tf.cast(model(images, training=False), tf.float32)
            return (tf.reduce_sum(per_example_loss(labels, probabilities)), correct(labels, probabilities),
                    tf.cast(tf.shape(labels)[0], tf.float32))

        return summed(strategy.run(replica, args=batch))

    train_batches = _distribute(strategy, train_data)
    val_batches = _distribute(strategy, val_data)
    steps = int(train_data.cardinality().numpy())
    for callback in callbacks:
        callback.set_model(model)
        callback.set_params({"epochs": epochs, "steps": steps, "verbose": 0})
        callback.on_train_begin()
    model.stop_training = False
    logs: dict[str, Any] = {}
    for epoch in range(initial_epoch, epochs):
        for callback in callbacks:
            callback.on_epoch_begin(epoch)
        totals = [0.0, 0.0, 0.0]
        for step, batch in enumerate(train_batches):
            loss, hits, count = train_step(batch)
            totals = [totals[0] + float(loss), totals[1] + float(hits), totals[2] + float(count)]
            for callback in callbacks:
                callback.on_train_batch_end(step, {"loss": totals[0] / max(totals[2], 1.0)})
        checks = [0.0, 0.0, 0.0]
        for batch in val_batches:
            loss, hits, count = eval_step(batch)
            checks = [checks[0] + float(loss), checks[1] + float(hits), checks[2] + float(count)]
        logs = {"accuracy": totals[1] / max(totals[2], 1.0), "loss": totals[0] / max(totals[2], 1.0),
                "val_accuracy": checks[1] / max(checks[2], 1.0), "val_loss": checks[0] / max(checks[2], 1.0)}
        for callback in callbacks:
            callback.on_epoch_end(epoch, dict(logs))
        if model.stop_training:
            break
    for callback in callbacks:
        callback.on_train_end(dict(logs))
    return logs
