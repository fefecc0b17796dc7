"""Online prediction throughput and latency, all in one script with the same model and images.

    python benchmarks/serve_bench.py [--model BUNDLE] [--requests 192] [--concurrency 1 16 64]

(a) ceiling: in-process, decode + batched predict (no HTTP);
(b) plain: a FastAPI app under uvicorn (separate process) that decodes and predicts once per request with
    the fastest single-image call, the original's design written well;
(c) skin-ray: this project's Serve app (ingress decodes, model replica batches) on a local Ray;
(d) fused: the same Serve app with decoding and batching in one deployment, to measure the ingress->model hop.
The load generator sends a fixed number of requests at each concurrency. Prints one JSON line.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, UploadFile
from starlette.concurrency import run_in_threadpool

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "skin_isic"


def load_images(count: int) -> list[bytes]:
    if REAL_DATA.is_dir():
        paths = sorted(REAL_DATA.glob("*/*.jpg"))[::7][:count]
        return [p.read_bytes() for p in paths]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from images import encode, lesion_image

    rng = np.random.default_rng(0)
    return [encode(lesion_image(("Cancer", "Non_Cancer")[i % 2], rng, size=224), "JPEG") for i in range(count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ceiling_images_per_second(model, images: list, batch_size: int = 32) -> float:
    from skin_ray.predictor import Predictor
    from skin_ray.preprocess import preprocess_image

    predictor = Predictor.from_bundle(model)
    predictor.predict_arrays(np.stack([preprocess_image(images[0])]))
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        predictor.predict_arrays(np.stack([preprocess_image(data) for data in images[start : start + batch_size]]))
    return len(images) / (time.perf_counter() - started)


PLAIN_APP = '''
import sys
import numpy as np
from fastapi import FastAPI, File, UploadFile
from starlette.concurrency import run_in_threadpool
from skin_ray.predictor import Predictor
from skin_ray.preprocess import preprocess_image
from skin_ray.runtime import limit_tensorflow_threads

limit_tensorflow_threads()
predictor = Predictor.from_bundle(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None)
predictor.predict_arrays(np.zeros((1, 170, 170, 3), np.float32))
app = FastAPI()

def classify(data: bytes) -> dict:
    probabilities = predictor.predict_arrays(preprocess_image(data)[None])[0]
    return predictor.to_prediction(probabilities).__dict__

@app.post("/predict")
async def predict(file: UploadFile = File(...)):
    return await run_in_threadpool(classify, await file.read())
'''


def start_plain_app(model: str | None, port: int, workdir: Path) -> subprocess.Popen:
    (workdir / "plain_app.py").write_text(PLAIN_APP)
    command = [sys.executable, "-c",
               f"import sys, uvicorn; sys.argv = ['x', {model or ''!r}]; sys.path.insert(0, {str(workdir)!r}); "
               f"import plain_app; uvicorn.run(plain_app.app, host='127.0.0.1', port={port}, log_level='warning')"]
    return subprocess.Popen(command)


def start_serve_app(model: str | None, port: int, fused: bool) -> None:
    from ray import serve

    from skin_ray.config import ServeSettings
    from skin_ray.serve import app_builder

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    if fused:
        serve.run(fused_app(model), name="fused", route_prefix="/fused")
    else:
        serve.run(app_builder(ServeSettings(model=model)), name="skin-ray", route_prefix="/")


def fused_app(model: str | None):
    """Decode and batch in one replica: no handle call between ingress and model."""
    from ray import serve

    app = FastAPI()

    @serve.deployment(max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.5})
    @serve.ingress(app)
    class Fused:
        def __init__(self, model):
            from skin_ray.predictor import Predictor
            from skin_ray.runtime import limit_tensorflow_threads

            limit_tensorflow_threads()
            self.predictor = Predictor.from_bundle(model)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def predict_batch(self, images: list) -> list:
            probabilities = await asyncio.to_thread(self.predictor.predict_arrays, np.stack(images))
            return [self.predictor.to_prediction(row).__dict__ for row in probabilities]

        @app.post("/predict")
        async def predict(self, file: UploadFile = File(...)):
            from skin_ray.preprocess import preprocess_image

            return await self.predict_batch(await run_in_threadpool(preprocess_image, await file.read()))

    return Fused.bind(model)


async def load(url: str, images: list[bytes], requests: int, concurrency: int) -> dict:
    import httpx

    latencies: list[float] = []
    failures = 0
    queue = iter(range(requests))

    async def worker(client):
        nonlocal failures
        for i in queue:
            started = time.perf_counter()
            response = await client.post(url, files={"file": ("x.jpg", images[i % len(images)], "image/jpeg")})
            latencies.append(time.perf_counter() - started)
            failures += response.status_code != 200

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await client.post(url, files={"file": ("x.jpg", images[0], "image/jpeg")})  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "images_per_s": round(requests / elapsed, 2),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1),
        "failures": failures,
    }


def wait_until_up(url: str, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=5)
            return
        except httpx.TransportError:
            time.sleep(1)
    raise RuntimeError(f"{url} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="bundle (default: the shipped model)")
    parser.add_argument("--requests", type=int, default=192, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    from skin_ray.runtime import init_ray, limit_tensorflow_threads

    limit_tensorflow_threads()
    images = load_images(64)
    report: dict = {"benchmark": "serve", "data": "skin_isic" if REAL_DATA.is_dir() else "generated",
                    "requests": args.requests, "cpus": os.cpu_count()}
    report["a_ceiling_images_per_s"] = round(ceiling_images_per_second(args.model, images * 3), 2)

    workdir = Path(os.environ.get("TMPDIR", "/tmp"))
    plain_port = free_port()
    plain = start_plain_app(args.model, plain_port, workdir)
    try:
        wait_until_up(f"http://127.0.0.1:{plain_port}/docs")
        report["b_plain"] = {c: asyncio.run(load(f"http://127.0.0.1:{plain_port}/predict", images, args.requests, c))
                             for c in args.concurrency}
    finally:
        plain.terminate()
        plain.wait()

    init_ray()
    serve_port = free_port()
    start_serve_app(args.model, serve_port, fused=False)
    start_serve_app(args.model, serve_port, fused=True)
    report["c_skin_ray"] = {c: asyncio.run(load(f"http://127.0.0.1:{serve_port}/predict", images, args.requests, c))
                            for c in args.concurrency}
    report["d_fused"] = {c: asyncio.run(load(f"http://127.0.0.1:{serve_port}/fused/predict", images, args.requests, c))
                         for c in args.concurrency}
    for c in args.concurrency:
        serve_rate = report["c_skin_ray"][c]["images_per_s"]
        report[f"ratio_c_over_a@{c}"] = round(serve_rate / report["a_ceiling_images_per_s"], 3)
        report[f"ratio_c_over_b@{c}"] = round(serve_rate / report["b_plain"][c]["images_per_s"], 3)
        report[f"ratio_c_over_d@{c}"] = round(serve_rate / report["d_fused"][c]["images_per_s"], 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
