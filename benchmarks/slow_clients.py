"""Normal clients' latency while 300 slow clients (slowloris) hold uploads open, against the same service
unloaded, in one run.

    python benchmarks/slow_clients.py [--slow 300] [--clients 4] [--seconds 20]

Starts `skin-ray serve` (shipped model, its own Ray) on a free port. Round 1: `--clients` closed-loop
clients post real ISIC JPEGs (generated lesions without the data set) for `--seconds`. Round 2: the same,
while `--slow` connections each send an upload's headers and then a byte a second, reconnecting when
answered (408: too slow, or cut for a faster upload). Prints p50/p95 of both rounds, their ratio, the slow
connections' answers and, last, one JSON line.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter

import httpx
import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from skin_ray.testing import (  # noqa: E402
    Locations,  # noqa: E402
    own_ray_environment,
    wait_healthy,
)

HEAD = (
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
)


def _images() -> list[bytes]:
    folder = Locations.from_environment().data / "Cancer"
    if folder.is_dir():
        return [path.read_bytes() for path in sorted(folder.rglob("*.jpg"))[:64]]
    from skin_ray.testing import encode, lesion_image

    rng = np.random.default_rng(0)
    return [encode(lesion_image("Cancer", rng), "JPEG") for _ in range(64)]


async def _latencies(url: str, images: list[bytes], clients: int, seconds: float, refused: list) -> list[float]:
    """Seconds per answer (503s retried after their Retry-After, counted in `refused`)."""
    latencies, deadline = [], time.monotonic() + seconds

    async def client(http, offset):
        i = offset
        while time.monotonic() < deadline:
            started = time.monotonic()
            while (
                response := await http.post("/predict", files={"file": ("x.jpg", images[i % len(images)], "image/jpeg")})
            ).status_code == 503:
                refused.append(1)
                await asyncio.sleep(float(response.headers["retry-after"]))  # as HTTP clients do
            response.raise_for_status()
            latencies.append(time.monotonic() - started)
            i += clients

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(client(http, offset) for offset in range(clients)))
    return latencies


class Slowloris:
    """`count` connections sending an upload a byte a second; each answered one reconnects."""

    def __init__(self, port: int, count: int):
        self.port, self.answers, self.stop = port, Counter(), threading.Event()
        self.connections = [self._open() for _ in range(count)]
        self.thread = threading.Thread(target=self._trickle, daemon=True)

    def _open(self) -> socket.socket:
        connection = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        connection.sendall(HEAD)
        connection.setblocking(False)
        return connection

    def _trickle(self) -> None:
        while not self.stop.wait(1):
            for i, connection in enumerate(self.connections):
                try:
                    answer = connection.recv(64)
                    self.answers[answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"] += 1
                    connection.close()
                    self.connections[i] = self._open()
                except BlockingIOError:
                    connection.send(b"x")
                except OSError as exc:
                    self.answers[type(exc).__name__] += 1
                    self.connections[i] = self._open()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        self.thread.join()
        for connection in self.connections:
            connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slow", type=int, default=300)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(["skin-ray", "serve", "--port", str(port)], env=own_ray_environment(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        images = _images()
        refused = {"unloaded": [], "loaded": []}
        asyncio.run(_latencies(url, images, args.clients, 3, []))  # warm-up
        unloaded = asyncio.run(_latencies(url, images, args.clients, args.seconds, refused["unloaded"]))
        with Slowloris(port, args.slow) as slow:
            loaded = asyncio.run(_latencies(url, images, args.clients, args.seconds, refused["loaded"]))
        figures = {
            name: {
                "answers": len(values),
                "503_retried": len(refused[key]),
                "p50_ms": round(1000 * float(np.percentile(values, 50)), 1),
                "p95_ms": round(1000 * float(np.percentile(values, 95)), 1),
            }
            for name, key, values in (("unloaded", "unloaded", unloaded), (f"{args.slow} slow clients", "loaded", loaded))
        }
        figures["p50_ratio"] = round(float(np.percentile(loaded, 50) / np.percentile(unloaded, 50)), 2)
        figures["slow_answers"] = dict(slow.answers)
        for name, value in figures.items():
            print(f"{name:>20}: {value}")
        print(json.dumps(figures))
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=120)


if __name__ == "__main__":
    main()
