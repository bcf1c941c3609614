"""Folder scoring with a stand-in predictor: batching, bounded concurrency, error rows, resuming."""

from __future__ import annotations

import csv
import threading
import time

import pytest
from PIL import Image

from cnnkit_client.errors import InvalidInputError, ServerError
from cnnkit_client.scoring import find_images, score_folder
from cnnkit_client.types import ClassScore, Prediction


class FakePredictor:
    """Labels each image by its file name; fails the ones named in ``fail`` with the given error."""

    def __init__(self, fail: dict[str, Exception] | None = None, delay: float = 0.0):
        self.fail = fail or {}
        self.delay = delay
        self.batches: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Lock()

    def predict(self, images, *, model, version=None, top_k=5, timeout=None):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            single = not isinstance(images, list)
            paths = [images] if single else images
            self.batches.append(len(paths))
            for path in paths:
                if path.name in self.fail:
                    raise self.fail[path.name]
            predictions = [Prediction(model, 1, (ClassScore(path.stem[0], 0, 0.9),)) for path in paths]
            return predictions[0] if single else predictions
        finally:
            with self.lock:
                self.in_flight -= 1

    def close(self):
        pass


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    for index in range(20):
        sub = root / ("x/y" if index % 2 else "z")
        sub.mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4)).save(sub / f"{'ab'[index % 2]}{index:02d}.PNG")
    (root / "z" / "readme.md").write_text("no")
    return root


def rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_images_are_found_recursively_by_suffix_in_a_stable_order(folder):
    found = [path.relative_to(folder).as_posix() for path in find_images(folder)]
    assert len(found) == 20 and "z/readme.md" not in found  # upper-case suffixes count, other files do not
    assert found[:2] == ["x/y/b01.PNG", "x/y/b03.PNG"] and found[-1] == "z/a18.PNG"
    with pytest.raises(InvalidInputError, match="not a folder"):
        find_images(folder / "missing")


def test_batches_are_bounded_and_a_bad_batch_is_split_to_find_the_bad_image(folder, tmp_path):
    predictor = FakePredictor(fail={"b03.PNG": InvalidInputError("corrupt", status=400)}, delay=0.01)
    summary = score_folder(predictor, folder, tmp_path / "out.csv", model="m", batch_size=4, concurrency=2,
                           progress=False)
    written = {row["path"]: row for row in rows(tmp_path / "out.csv")}
    assert (summary.scored, summary.errors) == (19, 1) and len(written) == 20
    assert written["x/y/b03.PNG"]["error"] == "corrupt" and written["x/y/b01.PNG"]["label"] == "b"
    assert predictor.most_in_flight <= 2 and max(predictor.batches) == 4
    assert summary.per_class == {"a": 10, "b": 9}


def test_transient_errors_are_retried_by_the_next_run_and_permanent_ones_are_not(folder, tmp_path):
    out = tmp_path / "out.csv"
    failing = FakePredictor(fail={"a00.PNG": ServerError("overloaded", status=500),
                                  "b01.PNG": InvalidInputError("corrupt", status=400)})
    score_folder(failing, folder, out, model="m", batch_size=1, progress=False)
    first = out.read_text()
    assert "[retry] overloaded" in first
    summary = score_folder(FakePredictor(), folder, out, model="m", progress=False)
    assert (summary.scored, summary.skipped) == (1, 19)
    assert out.read_text().startswith(first)
    last = {row["path"]: row for row in rows(out)}  # the newest row of a path wins
    assert last["z/a00.PNG"]["label"] == "a" and last["x/y/b01.PNG"]["error"] == "corrupt"


def test_options_and_output_names_are_checked(folder, tmp_path):
    with pytest.raises(InvalidInputError, match="at least 1"):
        score_folder(FakePredictor(), folder, tmp_path / "out.csv", model="m", concurrency=0, progress=False)
    with pytest.raises(InvalidInputError, match=".csv or .jsonl"):
        score_folder(FakePredictor(), folder, tmp_path / "out.txt", model="m", progress=False)


class DescribedPredictor(FakePredictor):
    """A predictor that serves ``models`` (name -> latest version) and answers at the pinned version."""

    def __init__(self, models: dict[str, int]):
        super().__init__()
        self.models = models
        self.pinned: set[int | None] = set()

    def metadata(self, model, *, version=None):
        from types import SimpleNamespace

        from cnnkit_client.errors import NotFoundError

        if model not in self.models:
            raise NotFoundError(f"Servable not found for request: Latest({model}); models: "
                                f"{', '.join(sorted(self.models))}.", status=404)
        return SimpleNamespace(version=version or self.models[model])

    def predict(self, images, *, model, version=None, top_k=5, timeout=None):
        self.pinned.add(version)
        answer = super().predict(images, model=model, version=version, top_k=top_k, timeout=timeout)
        rows = answer if isinstance(answer, list) else [answer]
        for row in rows:
            object.__setattr__(row, "version", version)
        return answer


def test_resuming_is_keyed_on_path_model_and_version(folder, tmp_path):
    out = tmp_path / "scores.csv"
    served = DescribedPredictor({"digits": 1, "letters": 4})
    first = score_folder(served, folder, out, model="digits", progress=False)
    assert (first.scored, first.skipped) == (20, 0) and served.pinned == {1}  # resolved once, then pinned
    again = score_folder(served, folder, out, model="digits", progress=False)
    assert (again.scored, again.skipped) == (0, 20)
    other_model = score_folder(served, folder, out, model="letters", progress=False)
    assert (other_model.scored, other_model.skipped) == (20, 0)  # not skipped because the paths match
    served.models["digits"] = 2  # a new version appeared: the output holds only version 1's rows
    newer = score_folder(served, folder, out, model="digits", progress=False)
    assert (newer.scored, newer.skipped) == (20, 0)
    pinned_old = score_folder(served, folder, out, model="digits", version=1, progress=False)
    assert (pinned_old.scored, pinned_old.skipped) == (0, 20)
    with open(out, newline="") as handle:
        keys = [(row["path"], row["model"], row["version"]) for row in csv.DictReader(handle)]
    assert len(keys) == len(set(keys)) == 60


def test_an_unknown_model_fails_before_anything_is_scored(folder, tmp_path):
    from cnnkit_client.errors import NotFoundError

    out = tmp_path / "scores.csv"
    with pytest.raises(NotFoundError, match="models: digits"):
        score_folder(DescribedPredictor({"digits": 1}), folder, out, model="digitz", progress=False)
    assert not out.exists()
