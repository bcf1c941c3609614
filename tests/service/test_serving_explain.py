"""Explanations in the service: the worker process, the checks in front of it, and the pattern cache."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from cnnkit.errors import InvalidInputError, NotFoundError, UnavailableError
from cnnkit.explain import SavedModelExplainer
from cnnkit.serving.core import InferenceCore
from cnnkit.serving.explain import Explanations
from cnnkit.serving.model_store import ModelStore

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def store(digits_repository):
    loaded = ModelStore(digits_repository, threads=1)
    loaded.refresh()
    return loaded


@pytest.fixture(scope="module")
def explanations(tmp_path_factory):
    opened = Explanations(cache_dir=tmp_path_factory.mktemp("cache"), threads=1)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def core(store, explanations):
    return InferenceCore(store, explanations=explanations)


@pytest.fixture(scope="module")
def digit(data_root):
    from cnnkit.training.data import load_dataset

    dataset = load_dataset("mnist", data_root, validation_size=10, test_limit=1)
    return dataset.x_test[0]


def test_gradcam_through_the_worker_matches_the_saved_model(core, store, digit):
    model = store.get("digits")
    answer = core.gradcam(model, digit, class_index=4, dtype="float32")
    assert answer["model"] == "digits" and answer["version"] == 1 and answer["layer"] == "conv2"
    assert answer["class_index"] == 4 and answer["class_name"] == "4"
    assert set(answer["predicted"]) == {"class_index", "class_name", "probability"}
    heatmap = np.frombuffer(base64.b64decode(answer["heatmap"]["data"]), "<f4").reshape(answer["heatmap"]["shape"])
    assert heatmap.shape == (28, 28) and heatmap.min() >= 0 and heatmap.max() <= 1
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"])))
    # The overlay (224 px) with the toolkit's caption and colour scale under it.
    assert overlay.size[0] >= 224 + 16 and overlay.size[1] >= 224 + 100 and overlay.mode == "RGB"
    # The same numbers as the SavedModel's gradcam signature called in this process.
    direct = SavedModelExplainer(model.path, model.metadata).gradcam(digit.astype(np.float32), 4)
    np.testing.assert_allclose(heatmap, direct.heatmap, atol=1e-6)
    # The predicted class by default; probabilities agree with ONNX Runtime's.
    default = core.gradcam(model, digit)
    onnx = model.predict(digit[None].astype(np.float32))[0]
    assert default["class_index"] == int(onnx.argmax())
    assert default["probability"] == pytest.approx(float(onnx.max()), abs=1e-4)


def test_gradcam_refuses_bad_requests_before_the_worker(core, store, digit):
    model = store.get("digits")
    with pytest.raises(InvalidInputError, match="Unknown class 'cat'"):
        core.gradcam(model, digit, class_name="cat")
    with pytest.raises(InvalidInputError, match="out of range"):
        core.gradcam(model, digit, class_index=10)
    # Field types and combinations are the request models' (tests/unit/test_requests.py).


def test_models_exported_before_gradcam_are_told_to_export_again(core, store, digit):
    from dataclasses import replace

    model = store.get("digits")
    old = replace(model, metadata={key: value for key, value in model.metadata.items() if key != "explain"})
    with pytest.raises(NotFoundError, match="exported without a Grad-CAM signature.*cnnkit export"):
        core.gradcam(old, digit)
    assert "gradcam" not in core.describe(old)["signatures"]
    assert core.describe(model)["explain"] == {"gradcam_layer": "conv2", "conv_layers": ["conv1", "conv2", "conv3"]}


def test_models_without_convolutions_are_refused(core, store, digit):
    from dataclasses import replace

    model = store.get("digits")
    pools_only = dict(model.metadata, explain={"gradcam_layer": None},
                      feature_layers=[layer for layer in model.feature_layers if "Pool" in layer["kind"]])
    flat = replace(model, metadata=pools_only)
    with pytest.raises(InvalidInputError, match="has no convolution layer: there is no heatmap"):
        core.gradcam(flat, digit)
    with pytest.raises(InvalidInputError, match="has no convolution layer: it has no filters"):
        core.filter_patterns(flat)


def test_filter_patterns_are_cached_per_filter_and_on_disk(core, store, explanations):
    model = store.get("digits")
    before = explanations.computed_filters
    first = core.filter_patterns(model, "conv1", 4, steps=10)
    assert first["cached"] is False and first["filters"] == [0, 1, 2, 3]
    assert explanations.computed_filters == before + 4
    grid = Image.open(io.BytesIO(base64.b64decode(first["grid_png"])))
    # Four 28 px patterns tripled, in a titled figure with a legend under them.
    assert grid.size[0] >= 4 * 84 + 3 * 2 and grid.size[1] > 84 + 60
    assert first["dead"] == []  # every conv1 filter of a trained model has a pattern
    assert len(first["mean_activation"]) == 4
    # Again: from the cache, the worker untouched, the same picture.
    again = core.filter_patterns(model, "conv1", 4, steps=10, arrays=True)
    assert again["cached"] is True and explanations.computed_filters == before + 4
    assert again["grid_png"] == first["grid_png"]
    assert again["patterns"]["shape"] == [4, 28, 28, 1] and again["patterns"]["dtype"] == "uint8"
    # More filters: only the new ones are computed.
    wider = core.filter_patterns(model, "conv1", 6, steps=10)
    assert wider["cached"] is False and explanations.computed_filters == before + 6
    # Other steps are another entry.
    core.filter_patterns(model, "conv1", [0], steps=5)
    assert explanations.computed_filters == before + 7
    # A new Explanations (a restarted service) reads the disk cache and starts no worker.
    fresh = Explanations(cache_dir=explanations.cache_dir)
    try:
        reread = InferenceCore(core.store, explanations=fresh).filter_patterns(model, "conv1", [5, 2], steps=10)
        assert reread["cached"] is True and fresh.workers_started == 0 and reread["filters"] == [5, 2]
    finally:
        fresh.close()
    files = list((explanations.cache_dir / "filter_patterns" / "digits").rglob("*.npz"))
    assert sorted(path.name for path in files) == ["conv1-steps10-seed0.npz", "conv1-steps5-seed0.npz"]


def test_an_answer_waits_for_its_patterns_to_be_stored(store, tmp_path, monkeypatch):
    """The worker's completion callback may store first; the request must not answer before it is done."""
    model = store.get("digits")
    opened = Explanations(cache_dir=tmp_path / "cache", threads=1)
    slow_save, original_save = [], Explanations._save_cache

    def save_slowly(entry, path):
        time.sleep(0.5)
        original_save(entry, path)
        slow_save.append(path)

    original_result = opened._result

    def late_result(future, what):
        answer = original_result(future, what)
        time.sleep(0.2)  # Let the completion callback win the race to store.
        return answer

    monkeypatch.setattr(Explanations, "_save_cache", staticmethod(save_slowly))
    monkeypatch.setattr(opened, "_result", late_result)
    try:
        answer = InferenceCore(store, explanations=opened).filter_patterns(model, "conv1", 3, steps=5)
        assert answer["filters"] == [0, 1, 2] and len(answer["mean_activation"]) == 3
        # The cache file is complete when the answer comes, not still being written.
        assert len(slow_save) == 1 and slow_save[0].is_file()
        assert not [path.name for path in slow_save[0].parent.iterdir() if path.name.startswith(".")]
    finally:
        opened.close()


def test_filter_pattern_requests_are_checked(core, store):
    model = store.get("digits")
    with pytest.raises(NotFoundError, match="no convolution layer 'pool1'"):
        core.filter_patterns(model, "pool1")
    with pytest.raises(InvalidInputError, match="has 6 filters"):
        core.filter_patterns(model, "conv1", [6])
    with pytest.raises(InvalidInputError, match="'steps' must be an integer from 1 to 200"):
        core.filter_patterns(model, "conv1", 2, steps=0)


def test_a_full_queue_answers_503(store, digit, tmp_path):
    busy = Explanations(cache_dir=tmp_path, max_queue=0)
    try:
        with pytest.raises(UnavailableError, match="already waiting"):
            busy.gradcam(store.get("digits"), digit)
        assert busy.workers_started == 0
    finally:
        busy.close()


def test_a_request_that_gives_up_leaves_the_patterns_computing_into_the_cache(store, tmp_path):
    impatient = Explanations(cache_dir=tmp_path, timeout=0.2, threads=1)
    model = store.get("digits")
    try:
        with pytest.raises(UnavailableError, match="took longer than"):
            impatient.filter_patterns(model, "conv1", 3, steps=5)  # the worker is still starting
        deadline = time.monotonic() + 120
        while True:
            try:
                result = impatient.filter_patterns(model, "conv1", 3, steps=5)
                break
            except UnavailableError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        assert result.filters == [0, 1, 2]
        assert impatient.computed_filters == 3 and impatient.workers_started == 1  # computed once
    finally:
        impatient.close()


def test_a_killed_worker_is_replaced(store, digit, tmp_path):
    model = store.get("digits")
    explanations = Explanations(cache_dir=tmp_path, threads=1)
    try:
        explanations.start()
        pid = explanations.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while explanations.worker_pid is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        result = explanations.gradcam(model, digit)
        assert result.heatmap.shape == (28, 28)
        assert explanations.workers_started == 2 and explanations.worker_pid not in (None, pid)
    finally:
        explanations.close()


def test_the_serving_process_never_imports_tensorflow(digits_repository, tmp_path):
    """Grad-CAM and patterns come back while TensorFlow stays out of the calling process."""
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from cnnkit.serving.core import InferenceCore
        from cnnkit.serving.explain import Explanations
        from cnnkit.serving.model_store import ModelStore

        store = ModelStore({str(digits_repository)!r}, threads=1)
        store.refresh()
        core = InferenceCore(store, explanations=Explanations(cache_dir={str(tmp_path)!r}, threads=1))
        model = store.get("digits")
        heat = core.gradcam(model, np.zeros((28, 28, 1), np.uint8))
        patterns = core.filter_patterns(model, "conv2", 2, steps=3)
        core.explanations.close()
        print(json.dumps({{"tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules,
                           "layer": heat["layer"], "filters": patterns["filters"]}}))
    """)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report == {"tensorflow": False, "keras": False, "layer": "conv2", "filters": [0, 1]}


def test_abandoned_explanation_work_is_stopped_at_its_time_limit(store, digit, tmp_path):
    """A job runs at most twice the request's timeout (long enough to land in the cache for the
    next request), then the worker drops it and is free for the next caller."""
    model = store.get("digits")
    explanations = Explanations(cache_dir=tmp_path, timeout=1.0, threads=1)
    try:
        explanations.start()
        deadline = time.monotonic() + 120
        while True:  # until TensorFlow is loaded and the model traced (seconds, more than the timeout)
            try:
                explanations.gradcam(model, digit)
                break
            except UnavailableError:
                assert time.monotonic() < deadline
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="took longer than"):
            # Every filter of conv3, 200 steps each: tens of seconds of ascent on 2 cores.
            explanations.filter_patterns(model, "conv3", 120, steps=200)
        # The job is stopped at its limit (2 s), so the worker answers again long before the
        # whole ascent could have finished...
        while True:
            try:
                explanations.gradcam(model, digit)
                break
            except UnavailableError:
                assert time.monotonic() - started < 10, "the worker is still busy with the abandoned job"
        # ...and the stopped job stored nothing.
        time.sleep(1.0)
        assert explanations.computed_filters == 0
    finally:
        explanations.close()


def test_work_whose_caller_left_is_withdrawn_from_the_worker(store, digit, tmp_path):
    """A caller that goes away (the front ends call CallerWatch.leave) withdraws its job: the
    worker stops it at its next filter instead of running it to its time limit."""
    import threading

    from cnnkit.serving import metrics
    from cnnkit.serving.callers import CallerWatch, watching

    model = store.get("digits")
    explanations = Explanations(cache_dir=tmp_path, timeout=60.0, threads=1)
    try:
        explanations.start()
        explanations.gradcam(model, digit)  # TensorFlow loaded and the model traced
        withdrawn = metrics.explanations_withdrawn_total._value.get()
        caller = CallerWatch()
        threading.Timer(1.0, caller.leave).start()
        started = time.monotonic()
        with watching(caller), pytest.raises(UnavailableError, match="withdrawn"):
            # Every filter of conv3, 200 steps each: tens of seconds of ascent on 2 cores.
            explanations.filter_patterns(model, "conv3", 120, steps=200)
        assert time.monotonic() - started < 10, "the withdrawn job ran on"
        assert metrics.explanations_withdrawn_total._value.get() == withdrawn + 1
        explanations.gradcam(model, digit)  # the worker is free again
        assert explanations.computed_filters == 0

        # A caller that stays gets its answer, and its watch is let go of afterwards.
        staying = CallerWatch()
        with watching(staying):
            assert explanations.filter_patterns(model, "conv1", 2, steps=3).filters == [0, 1]
        staying.leave()
        assert metrics.explanations_withdrawn_total._value.get() == withdrawn + 1
    finally:
        explanations.close()
