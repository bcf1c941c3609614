"""The command line's output: no TensorFlow chatter unless --verbose, one line per training epoch, and
the listing commands never import TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TENSORFLOW_NOISE = ("absl::InitializeLog", "cuInit", "cudart_stub", "oneDNN", "TF_ENABLE_ONEDNN_OPTS")


@pytest.mark.parametrize("arguments", [["--help"], ["models"], ["recipes"], ["results", "."], ["--version"]])
def test_listing_commands_import_no_tensorflow(arguments, tmp_path):
    code = ("import json, sys\nfrom cnnkit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            "    pass\nprint(json.dumps(sorted(name for name in sys.modules if name.split('.')[0] in "
            "('tensorflow', 'keras'))), file=sys.stderr)\n")
    (tmp_path / "run").mkdir()
    result = subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert json.loads(result.stderr.strip().splitlines()[-1]) == [], result.stderr


@pytest.mark.data
def test_training_prints_one_line_per_epoch_and_no_tensorflow_noise(tmp_path, data_root):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("name: tiny\ndataset: mnist\nmodel: lenet5\nchannels: 1\nvalidation_size: 100\n"
                      "train_limit: 300\ntest_limit: 100\nepochs: 2\nbatch_size: 64\n")
    environment = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    environment["CNNKIT_DATA_DIR"] = str(data_root)
    result = subprocess.run([sys.executable, "-m", "cnnkit", "train", str(recipe), "--output", str(tmp_path / "run"),
                             "--no-evaluate"], capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert not [line for line in output.splitlines() if any(noise in line for noise in TENSORFLOW_NOISE)], output
    epochs = [line for line in result.stderr.splitlines() if line.startswith("[cnnkit] epoch ")]
    assert [line.split()[2] for line in epochs] == ["1/2", "2/2"], result.stderr
    assert "step" not in output.replace("steps_per_execution", "")  # no Keras progress lines ("5/5 ... ms/step")
