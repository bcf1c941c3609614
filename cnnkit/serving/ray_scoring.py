"""``cnnkit score --engine ray``: folder scoring on Ray Data, for folders too big for one machine.

The same scoring as the local engine (:func:`cnnkit_client.scoring.score_folder` with
:class:`cnnkit.serving.local.LocalClient`), spread over a Ray cluster: the image paths become a Ray
dataset, ``map_batches`` hands batches to a pool of actors that each hold the model's ONNX Runtime
session (one per actor, loaded once), and the driver appends the rows to the same CSV or JSON-lines
file as they stream back, so an interrupted run resumes exactly as the local one does (the rows
already in the output are skipped). The actors read the files themselves: on a cluster the folder
must be on storage every node sees (a network file system), as for any Ray Data job.

Without an address a local Ray instance is started with ``actors`` CPUs and shut down at the end;
with ``--ray-address`` (or ``RAY_ADDRESS``) the job joins that cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from cnnkit.serving.local import LocalClient
from cnnkit_client.scoring import ResultsFile, Row, Summary, _progress, _score_batch, find_images, resolve_version


class _Scorer:
    """A Ray actor: one LocalClient (its ONNX Runtime session) for every batch it is given."""

    def __init__(self, repository: str, root: str, model: str, version: int | None, top_k: int):
        self.client = LocalClient(repository, threads=1)
        self.root = Path(root)
        self.model, self.version, self.top_k = model, version, top_k

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        paths = [Path(str(path)) for path in batch["path"]]
        rows = _score_batch(self.client, self.root, paths, self.model, self.version, self.top_k)
        return {"row": [json.dumps(dataclasses.asdict(row)) for row in rows]}


def score_folder_ray(repository: str | os.PathLike, root: Path, out: Path, *, model: str,
                     version: int | None = None, top_k: int = 5, batch_size: int = 16, actors: int = 2,
                     address: str | None = None, progress: bool = True) -> Summary:
    """Score every image under ``root`` into ``out`` on Ray; the same rows as the local engine."""
    import ray

    if actors < 1 or batch_size < 1 or top_k < 1:
        raise ValueError("--actors, --batch-size and --top-k must be at least 1.")
    root = Path(root).resolve()
    results = ResultsFile(Path(out))
    images = find_images(root)
    version = resolve_version(LocalClient(repository), model, version)  # NotFoundError names the models
    done = results.done(model, version)
    todo = [path for path in images if path.relative_to(root).as_posix() not in done]
    summary = Summary(skipped=len(images) - len(todo))
    if not todo:
        return summary
    started_here = not ray.is_initialized()
    if started_here:
        address = address or os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, num_cpus=None if address else actors, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    bar = _progress(len(todo), progress)
    started = time.perf_counter()
    results.open()
    try:
        dataset = ray.data.from_items([{"path": str(path)} for path in todo],
                                      override_num_blocks=max(1, min(len(todo) // batch_size, 200)))
        scored = dataset.map_batches(
            _Scorer, fn_constructor_args=(str(Path(repository).resolve()), str(root), model, version, top_k),
            batch_size=batch_size, concurrency=actors, num_cpus=1, batch_format="numpy",
        )
        for item in scored.iter_rows():
            row = Row(**json.loads(item["row"]))
            results.append(row)
            if row.error:
                summary.errors += 1
            else:
                summary.scored += 1
                summary.per_class[row.labels[0]] += 1
            bar.update(1)
    finally:
        results.close()
        bar.close()
        summary.seconds = time.perf_counter() - started
        if started_here:
            ray.shutdown()
    return summary
