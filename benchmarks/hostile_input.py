"""The hostile-input corpus (cnnkit.loadtests.hostile) against a real service, measured.

For each case, in one run on one machine: the answer's status, the time to refuse, the service's
peak resident memory (all its processes, sampled every 10 ms) against its memory before, and the
latency of ``GET /livez`` probed every 20 ms while the case runs, from a process of its own (a probe
thread beside the threads sending the case would measure this process's interpreter lock as
well as the server). Bounded: each case is one request
(five for the large-body cases), each refused in seconds at most.

    python benchmarks/hostile_input.py [--run runs/mnist_convnet | --tiny-recipe mnist_convnet] [--model digits]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# The health probe's process: GET /livez every 20 ms until its standard input closes, saying
# "ready" after the first answer, then print the latencies (ms) as a JSON list.
PROBE = """
import json, sys, threading, time
import httpx

stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
latencies = []
with httpx.Client(base_url=sys.argv[1], timeout=10) as probe:
    while not stop.is_set():
        started = time.perf_counter()
        try:
            probe.get("/livez")
        except httpx.HTTPError:
            pass
        if not latencies:
            print("ready", flush=True)
        latencies.append((time.perf_counter() - started) * 1000)
        stop.wait(0.02)
print(json.dumps(latencies))
"""


class Sampler:
    """Samples the service's resident memory (a thread here) and /livez latency (a probe process)
    until stopped."""

    def __init__(self, pid: int, url: str):
        import psutil

        self.root = psutil.Process(pid)
        self.url = url
        self.peak = 0
        self.health_ms: list[float] = []
        self.stopping = threading.Event()
        self.memory = threading.Thread(target=self._memory, daemon=True)
        self.probe: subprocess.Popen | None = None

    def resident(self) -> int:
        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(Exception):  # a child that just exited
                total += process.memory_info().rss
        return total

    def _memory(self) -> None:
        while not self.stopping.is_set():
            self.peak = max(self.peak, self.resident())
            self.stopping.wait(0.01)

    def start(self) -> None:
        self.memory.start()
        self.probe = subprocess.Popen([sys.executable, "-c", PROBE, self.url], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        assert self.probe.stdout is not None
        self.probe.stdout.readline()  # "ready": the prober's start-up is not part of the case

    def stop(self) -> None:
        self.stopping.set()
        self.memory.join()
        assert self.probe is not None
        output, _ = self.probe.communicate("", timeout=60)
        self.health_ms = json.loads(output.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/mnist_convnet")
    parser.add_argument("--tiny-recipe", default=None, help="train a tiny run of this recipe instead of --run")
    parser.add_argument("--model", default="digits", help="must be the corpus's model name (digits)")
    args = parser.parse_args()

    from serving_throughput import prepare_model

    from cnnkit.loadtests.hostile import corpus
    from cnnkit.serving.process import ServiceProcess

    with tempfile.TemporaryDirectory(prefix="cnnkit-hostile-") as folder:
        workdir = Path(folder)
        _, repository, _, _ = prepare_model(args.run, args.tiny_recipe, args.model, workdir)
        with ServiceProcess(repository, workdir) as service:
            rows = []
            for case in corpus():
                sampler = Sampler(service.pid, service.url)
                before = sampler.resident()
                sampler.start()
                outcomes = case.send(service.url, service.grpc_target)
                sampler.stop()
                health = sorted(sampler.health_ms) or [float("nan")]
                rows.append((
                    case.name,
                    ", ".join(sorted({outcome.status for outcome in outcomes})),
                    "yes" if all(case.accepts(outcome) for outcome in outcomes) else "NO",
                    max(outcome.seconds for outcome in outcomes) * 1000,
                    before / 2**20, (sampler.peak - before) / 2**20,
                    statistics.median(health), health[-1], len(health),
                ))
                print(f"{rows[-1][0]}: {rows[-1][1]}", file=sys.stderr, flush=True)
    print("| case | answer | as expected | time to refuse (ms) | server before (MB) | peak growth (MB) "
          "| /livez p50 ms | /livez max ms | probes |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, status, ok, refuse_ms, before_mb, growth_mb, health_p50, health_max, probes in rows:
        print(f"| {name} | {status} | {ok} | {refuse_ms:.1f} | {before_mb:.0f} | {growth_mb:+.0f} | "
              f"{health_p50:.1f} | {health_max:.1f} | {probes} |")
    return 0 if all(row[2] == "yes" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
