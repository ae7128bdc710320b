"""Soak the real Gradio app: many requests from many users on loopback, then its memory.

    python bench/soak.py [--model checkpoints] [--requests 200] [--threads 8] [--warmup 20]

Starts app/app.py as its own process on a free loopback port and sends it --requests requests
from --threads users at once, each user with a session of its own (gradio_client): an aging
first, then a seeded mix of agings (the three example photos, with and without identity
optimization), blends and sweeps. Every request must be answered, and the server's resident
memory after the soak must stay within 15% of its memory after the first --warmup requests
(caches filled, nothing leaking). Prints the figures; exit code 1 when either fails.
"""

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = [ROOT / "app" / "examples" / name for name in ("eileen_collins.jpg", "grace_hopper.jpg")]
PHOTOS.append(ROOT / "app" / "examples" / "cameraman.jpg")
MAX_GROWTH = 0.15  # memory after the soak / after the warm-up, at most 1.15


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int) -> tuple[float, float]:
    """Resident (VmRSS) and peak resident (VmHWM) memory of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def start_app(model: str, timeout_s: float = 180.0):
    """app/app.py on a free loopback port; returns the process and its URL once it answers."""
    from gradio_client import Client

    port = free_port()
    env = os.environ | {"GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, str(ROOT / "app" / "app.py"), "--model", model]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    log = Path(tempfile.mkdtemp(prefix="agecgan-soak-")) / "app.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=output)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + timeout_s
    while True:
        try:
            Client(url, verbose=False, download_files=False)
            return process, url
        except Exception as error:  # not listening yet
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the app did not start: {log.read_text()}") from error
            time.sleep(1.0)


class Soak:
    """The shared ticket counter, the answers, and the memory read after the warm-up."""

    def __init__(self, requests: int, warmup: int, pid: int):
        self.requests, self.warmup, self.pid = requests, warmup, pid
        self.lock = threading.Lock()
        self.issued = self.done = 0
        self.latencies = defaultdict(list)  # endpoint -> seconds
        self.failures: list[str] = []
        self.after_warmup: float | None = None

    def ticket(self) -> bool:
        with self.lock:
            if self.issued >= self.requests:
                return False
            self.issued += 1
            return True

    def record(self, endpoint: str, seconds: float, failure: str | None) -> None:
        with self.lock:
            self.latencies[endpoint].append(seconds)
            if failure:
                self.failures.append(f"{endpoint}: {failure}")
            self.done += 1
            if self.done == self.warmup:
                self.after_warmup = rss_mib(self.pid)[0]


def user(soak: Soak, url: str, seed: int) -> None:
    """One user: an aging first (the sliders need a session's photo), then a seeded mix."""
    from gradio_client import Client, handle_file

    rng = random.Random(seed)
    client = Client(url, verbose=False, download_files=False)
    aged = False
    while soak.ticket():
        kind = "age" if not aged else rng.choices(["age", "blend", "sweep"], [3, 4, 3])[0]
        start, failure = time.perf_counter(), None
        try:
            if kind == "age":
                photo, steps = rng.choice(PHOTOS), rng.choice([0, 0, 5])
                age = rng.choice([None, 25, 45, 70])
                faces, pasted, *_ = client.predict(
                    handle_file(str(photo)), age, steps > 0, steps, api_name="/age"
                )
                if len(faces) != 7 or len(pasted) != 6:
                    failure = f"{len(faces)} faces, {len(pasted)} photos"
                aged = True
            elif kind == "blend":
                weights = [rng.random() for _ in range(6)]
                face, photo = client.predict(*weights, api_name="/blend")
            else:
                face, photo, *weights = client.predict(rng.uniform(0, 5), api_name="/sweep")
                if len(weights) != 6:
                    failure = f"{len(weights)} weights"
        except Exception as error:  # an answer that is an error counts as unanswered
            failure = f"{type(error).__name__}: {error}"
        soak.record(kind, time.perf_counter() - start, failure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "checkpoints"), help="model folder")
    parser.add_argument("--requests", type=int, default=200, help="requests in all")
    parser.add_argument("--threads", type=int, default=8, help="users at once")
    parser.add_argument("--warmup", type=int, default=20, help="requests before the baseline")
    args = parser.parse_args()

    process, url = start_app(args.model)
    try:
        idle = rss_mib(process.pid)[0]
        soak = Soak(args.requests, args.warmup, process.pid)
        start = time.perf_counter()
        users = [
            threading.Thread(target=user, args=(soak, url, seed)) for seed in range(args.threads)
        ]
        for thread in users:
            thread.start()
        for thread in users:
            thread.join()
        wall = time.perf_counter() - start
        after, peak = rss_mib(process.pid)
    finally:
        process.terminate()
        process.wait(30)

    answered = soak.done - len(soak.failures)
    print(f"soak: {soak.done} requests from {args.threads} users in {wall:.1f} s, {url}")
    print(f"  answered          {answered}/{args.requests}")
    for endpoint, times in sorted(soak.latencies.items()):
        times = sorted(times)
        p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
        median = statistics.median(times)
        print(f"  {endpoint:<6} {len(times):4d} requests, median {median:.2f} s, p95 {p95:.2f} s")
    baseline = soak.after_warmup or after
    growth = after / baseline - 1
    print(
        f"  memory (RSS)      idle {idle:.0f} MiB, after {args.warmup} requests {baseline:.0f} MiB"
    )
    print(
        f"                    after {soak.done}: {after:.0f} MiB ({growth:+.1%}), peak {peak:.0f}"
    )
    for failure in soak.failures[:10]:
        print(f"  failed: {failure}")
    ok = answered == args.requests and growth <= MAX_GROWTH
    print(f"  verdict           {'pass' if ok else 'FAIL'} (all answered, growth <= 15%)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
