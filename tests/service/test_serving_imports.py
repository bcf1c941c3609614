"""Importing the server's front ends loads neither TensorFlow nor the training toolkit."""

from __future__ import annotations

import json
import subprocess
import sys


def test_importing_the_server_front_ends_imports_no_tensorflow(tmp_path):
    code = (
        "import json, sys\n"
        "import cnnkit.serving.http.service, cnnkit.serving.grpc.server, cnnkit.serving.core\n"
        "import cnnkit.serving.local, cnnkit.serving.explain\n"
        "print(json.dumps(sorted(name for name in sys.modules\n"
        "                        if name.split('.')[0] in ('tensorflow', 'keras', 'tensorflow_serving')\n"
        "                        or name.startswith('cnnkit.training'))))\n"
    )
    environment = {"PATH": "/usr/bin:/bin", "BENTOML_HOME": str(tmp_path / "bentoml"), "CNNKIT_GRPC_PORT": "-1",
                   "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
