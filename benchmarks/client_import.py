"""Cold import time of the SDK in fresh processes (target: under 0.5 s), and what it loads.

    python benchmarks/client_import.py [--runs 7]

Each run starts a new interpreter and times ``import cnnkit_client`` plus touching the client
classes (HTTP and gRPC); prints the median, the fastest, and whether TensorFlow was loaded.
For comparison it also times ``import tensorflow_serving.apis.predict_pb2`` when installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys

PROBE = """
import json, sys, time
started = time.perf_counter()
{statement}
seconds = time.perf_counter() - started
print(json.dumps({{"seconds": seconds, "tensorflow": "tensorflow" in sys.modules, "modules": len(sys.modules)}}))
"""

SDK = "import cnnkit_client\ncnnkit_client.Client, cnnkit_client.GrpcClient"
TF_SERVING = "from tensorflow_serving.apis import predict_pb2"


def measure(statement: str, runs: int) -> list[dict]:
    results = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", PROBE.format(statement=statement)], capture_output=True,
                              text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    rows = [("cnnkit_client (Client + GrpcClient)", measure(SDK, args.runs))]
    with contextlib.suppress(subprocess.CalledProcessError):  # not installed: no comparison
        rows.append(("tensorflow_serving.apis.predict_pb2", measure(TF_SERVING, max(2, args.runs // 3))))
    print(f"{'import':40s} {'median':>8s} {'fastest':>8s} {'modules':>8s}  tensorflow loaded")
    for label, results in rows:
        seconds = [result["seconds"] for result in results]
        print(f"{label:40s} {statistics.median(seconds):7.3f}s {min(seconds):7.3f}s "
              f"{results[0]['modules']:8d}  {results[0]['tensorflow']}")
    if len(rows) == 2:
        medians = [statistics.median(result["seconds"] for result in results) for _, results in rows]
        print(f"the SDK imports {medians[1] / medians[0]:.0f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
