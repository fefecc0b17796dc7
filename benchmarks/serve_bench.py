"""Online prediction throughput and latency: ceilings, a plain uvicorn app and every serving layout, one run.

    python benchmarks/serve_bench.py [--bundle BUNDLE] [--seconds 15] [--concurrency 1 16 64]
    python benchmarks/serve_bench.py --peers [--peers-only mosec,litserve,pytriton,bentoml,fastapi-pob]
    python benchmarks/serve_bench.py --keys        (the shipped service without and with API keys)
    python benchmarks/serve_bench.py --audit       (the shipped service plain, with drift windows, with drift and audit)
    python benchmarks/serve_bench.py --explain-load (/predict's latency alone and beside 32 /explain clients)
    python benchmarks/serve_bench.py --protocol    (the Open Inference Protocol's binary path against /predict, PyTriton)
    python benchmarks/serve_bench.py --cpu-by-process --concurrency 64
                                                 (CPU per image of each process of the shipped service under load)
    python benchmarks/serve_bench.py --versions [--baseline-checkout DIR] --concurrency 16 64
                                                 (one bundle, two at 90/10, one with a 100% shadow)

Default: the in-process ceilings (single thread: decode then batch-32 predict; pipelined: decoding on two
threads overlapped with batch-32 inference; and one image alone), a plain FastAPI app under uvicorn that
decodes and predicts once per request, then `skin-ray serve` itself in each layout (the shipped default,
the split layout, and the default without Ray's fast path), `serve run deployments/serve_config.yaml`, and
`POST /predict/batch` with 16 images per request.
--peers: the serving systems in ../shared/peers (its run_peers.sh, README there) on the same model file,
then `skin-ray serve` as shipped, in the same round.

Every HTTP figure comes from the peers' closed-loop client (../shared/peers/loadgen.py: C clients, each
keeping one multipart JPEG upload in flight), run with this interpreter, so every server meets the same
client. Servers run one at a time, each in its own process group, and are stopped before the next starts.
Prints a table and, last, one JSON line.
"""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from skin_ray.testing import (
    Locations,  # noqa: E402
    free_port,  # noqa: E402
)

ROOT = Path(__file__).resolve().parents[1]
PEERS = Locations.from_environment().peers
IMAGES = Locations.from_environment().data / "Cancer"  # the folder the peers measure with
LOADGEN = PEERS / "loadgen.py"
SHIPPED = "skin-ray serve (shipped: fused, HAProxy)"
FLOAT32 = "skin-ray serve --runtime float32 (its Keras network, as the peers run it)"
NO_FAST_PATH = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}


def ceilings(model: str | None, images: list[bytes], batch_size: int = 32) -> dict:
    """In-process images/s with no HTTP: sequential and pipelined decode + batch predict, and one image alone."""
    from skin_ray.predictor import Predictor

    predictor = Predictor.from_bundle(model)
    batches = [images[start : start + batch_size] for start in range(0, len(images), batch_size)]
    predictor.predict_pixels(np.stack([predictor.decode_pixels(data) for data in batches[0]]))

    started = time.perf_counter()
    for batch in batches:
        predictor.predict_pixels(np.stack([predictor.decode_pixels(data) for data in batch]))
    sequential = len(images) / (time.perf_counter() - started)

    with ThreadPoolExecutor(2) as decoders:  # decoding runs ahead while the model computes the previous batch
        started = time.perf_counter()
        decoded = [decoders.map(predictor.decode_pixels, batch) for batch in batches]
        for pixels in decoded:
            predictor.predict_pixels(np.stack(list(pixels)))
        pipelined = len(images) / (time.perf_counter() - started)

    single_ms = []
    for data in images[:64]:
        started = time.perf_counter()
        predictor.predict_pixels(predictor.decode_pixels(data)[None])
        single_ms.append(1000 * (time.perf_counter() - started))
    return {"sequential": round(sequential, 1), "pipelined": round(pipelined, 1),
            "single_image_ms": round(float(np.median(single_ms)), 1)}


def load(url: str, concurrency: list[int], seconds: float, triton_model: str | None = None) -> dict:
    """The peers' client against `url` (multipart /predict; with `triton_model`, the Open Inference Protocol's
    binary image path of that model below `url`); {concurrency: {rps, p50_ms, p99_ms, errors}}."""
    flavour = ["--flavour", "triton", "--triton-model", triton_model] if triton_model else ["--flavour", "multipart"]
    command = [sys.executable, str(LOADGEN), "--url", url, *flavour, "--images", str(IMAGES),
               "--concurrency", ",".join(map(str, concurrency)), "--seconds", str(seconds), "--warmup", "8"]
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    return by_concurrency(result["levels"])


def by_concurrency(levels: list[dict]) -> dict:
    """The client's per-level results -> {concurrency: {rps, p50_ms, p99_ms, errors}}."""
    return {level["concurrency"]: {key: level[key] for key in ("rps", "p50_ms", "p99_ms", "errors")} for level in levels}


def load_batches(
    url: str, images: list[bytes], files_per_request: int, clients: int, seconds: float, headers: dict | None = None
) -> dict:
    """Closed loop of `clients`, each keeping one `POST /predict/batch` of `files_per_request` images in flight,
    sending `headers` (an API key, say) with each."""
    import aiohttp

    async def run() -> dict:
        done, latencies, errors = 0, [], 0
        deadline = time.perf_counter() + seconds

        async def client(session, offset):
            nonlocal done, errors
            while time.perf_counter() < deadline:
                form = aiohttp.FormData()
                for i in range(files_per_request):
                    form.add_field("files", images[(offset + i) % len(images)], filename=f"{i}.jpg", content_type="image/jpeg")
                started = time.perf_counter()
                async with session.post(url, data=form, headers=headers) as response:
                    results = (await response.json()).get("results", [])
                latencies.append(time.perf_counter() - started)
                ok = sum("label" in result for result in results)
                done, errors = done + ok, errors + files_per_request - ok

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            started = time.perf_counter()
            await asyncio.gather(*(client(session, k * files_per_request) for k in range(clients)))
            elapsed = time.perf_counter() - started
        return {"images_per_s": round(done / elapsed, 1), "p50_ms": round(1000 * float(np.median(latencies)), 1),
                "errors": errors}

    return asyncio.run(run())


class Server:
    """A server command in its own process group: started, awaited until it answers, stopped with SIGINT."""

    def __init__(self, command: list[str], health_url: str, env: dict | None = None, cwd: Path = ROOT):
        self.health_url = health_url
        self.said = tempfile.TemporaryFile("w+")  # what it printed: the reason, if it does not come up
        self.process = subprocess.Popen(
            command, env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
            stdout=self.said, stderr=subprocess.STDOUT, text=True,
            # A benchmark started in the background inherits an ignored SIGINT; the server must see Ctrl-C.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    def __enter__(self):
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.said.seek(0)
                said = self.said.read()[-3000:]
                raise RuntimeError(f"{self.process.args} exited with {self.process.returncode}:\n{said}")
            try:
                if httpx.get(self.health_url, timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.health_url} did not come up")

    def __exit__(self, *_):
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout=120)
        finally:
            try:  # whatever the server left in its group (a crashed Ray's workers) must not load the next one
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()


PLAIN_APP = '''
import numpy as np
from fastapi import FastAPI, File, UploadFile
from starlette.concurrency import run_in_threadpool
from skin_ray.predictor import Predictor
from skin_ray.runtime import limit_tensorflow_threads

limit_tensorflow_threads()
predictor = Predictor.from_bundle(MODEL)
app = FastAPI()

def classify(data: bytes) -> dict:
    return predictor.to_prediction(predictor.predict_pixels(predictor.decode_pixels(data)[None])[0]).__dict__

@app.get("/healthz")
def healthz():
    return {}

@app.post("/predict")
async def predict(file: UploadFile = File(...)):
    return await run_in_threadpool(classify, await file.read())
'''


def plain_command(model: str | None, port: int, workdir: Path) -> list[str]:
    (workdir / "plain_app.py").write_text(PLAIN_APP.replace("MODEL", repr(model)))
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(workdir), "plain_app:app", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning"]


def serve_run_command(port: int, workdir: Path) -> list[str]:
    import yaml

    config = yaml.safe_load((ROOT / "deployments" / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    (workdir / "serve_config.yaml").write_text(yaml.safe_dump(config))
    return ["serve", "run", str(workdir / "serve_config.yaml")]


def servers(model: str | None, workdir: Path) -> dict[str, tuple[Callable[[int], list[str]], dict]]:
    """Label -> (the command for a port, extra environment) for every server measured."""
    from skin_ray.runtime import SERVE_ENVIRONMENT

    def skin_ray_serve(*flags: str) -> Callable[[int], list[str]]:
        return lambda port: ["skin-ray", "serve", "--port", str(port), *(["--bundle", model] if model else []), *flags]

    return {
        "plain FastAPI + uvicorn, one predict per request": (lambda port: plain_command(model, port, workdir), {}),
        SHIPPED: (skin_ray_serve(), {}),
        FLOAT32: (skin_ray_serve("--runtime", "float32"), {}),
        "skin-ray serve --layout split": (skin_ray_serve("--layout", "split"), {}),
        "skin-ray serve, Ray's default proxy": (skin_ray_serve(), NO_FAST_PATH),
        "serve run deployments/serve_config.yaml": (lambda port: serve_run_command(port, workdir), SERVE_ENVIRONMENT),
    }


def table(rows: dict[str, dict], concurrency: list[int], reference: float, reference_name: str) -> str:
    lines = [f"| server | {' | '.join(f'c={c}' for c in concurrency)} | x {reference_name} at c={concurrency[-1]} |",
             "| --- |" + " --- |" * (len(concurrency) + 1)]
    for name, levels in rows.items():
        cells = [f"{levels[c]['rps']:.1f} img/s (p50 {levels[c]['p50_ms']:.0f}, p99 {levels[c]['p99_ms']:.0f} ms)"
                 + (f" errors {levels[c]['errors']}" if levels[c]["errors"] else "") for c in concurrency]
        lines.append(f"| {name} | {' | '.join(cells)} | {levels[concurrency[-1]]['rps'] / reference:.2f} |")
    return "\n".join(lines)


def run_layouts(args, images: list[bytes], workdir: Path) -> dict:
    report: dict = {"ceiling": ceilings(args.bundle, images * 2)}
    rows: dict[str, dict] = {}
    for name, (command, env) in servers(args.bundle, workdir).items():
        port = free_port()
        with Server(command(port), f"http://127.0.0.1:{port}/healthz", env):
            rows[name] = load(f"http://127.0.0.1:{port}/predict", args.concurrency, args.seconds)
            if name == SHIPPED:
                report["predict_batch_16_files_4_clients"] = load_batches(
                    f"http://127.0.0.1:{port}/predict/batch", images, 16, 4, args.seconds
                )
    ceiling = report["ceiling"]
    print(f"in-process ceilings: single thread {ceiling['sequential']} img/s, pipelined {ceiling['pipelined']} img/s, "
          f"one image {ceiling['single_image_ms']} ms")
    print(table(rows, args.concurrency, ceiling["pipelined"], "pipelined ceiling"))
    batch = report["predict_batch_16_files_4_clients"]
    print(f"POST /predict/batch, 16 files per request, 4 clients: {batch['images_per_s']} img/s "
          f"({batch['images_per_s'] / ceiling['pipelined']:.2f} x pipelined ceiling), p50 {batch['p50_ms']} ms")
    report["servers"] = rows
    return report


def peer_rows(args, workdir: Path, peers: str) -> dict[str, dict]:
    """../shared/peers/run_peers.sh with `peers` on the shipped model file: each peer's figures."""
    model_file = Path(args.bundle or ROOT / "skin_ray" / "bundles" / "default") / "model.keras"
    out = workdir / "peers"
    command = [str(PEERS / "run_peers.sh"), "--model", str(model_file), "--import", "skin_ray.model", "--images", str(IMAGES),
               "--only", peers, "--concurrency", ",".join(map(str, args.concurrency)),
               "--seconds", str(args.seconds), "--out", str(out)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    rows: dict[str, dict] = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        peer = json.loads(line)
        if peer.get("status") == "ok":
            rows[peer["peer"]] = by_concurrency(peer["result"]["levels"])
    return rows


def run_peers(args, workdir: Path) -> dict:
    """The peers, then `skin-ray serve` as shipped and with its Keras network (the model the peers run), with the
    same client; skin-ray's ratio to the best peer at each concurrency."""
    rows = peer_rows(args, workdir, args.peers_only)
    for name in (SHIPPED, FLOAT32):
        port = free_port()
        command, env = servers(args.bundle, workdir)[name]
        with Server(command(port), f"http://127.0.0.1:{port}/healthz", env):
            rows[name] = load(f"http://127.0.0.1:{port}/predict", args.concurrency, args.seconds)
    peers = [name for name in rows if not name.startswith("skin-ray")]
    best = {c: max(peers, key=lambda name: rows[name][c]["rps"]) for c in args.concurrency}
    last = args.concurrency[-1]
    print(table(rows, args.concurrency, rows[best[last]][last]["rps"], f"best peer ({best[last]})"))
    ratios = {name: {c: round(rows[name][c]["rps"] / rows[best[c]][c]["rps"], 3) for c in args.concurrency}
              for name in (SHIPPED, FLOAT32)}
    for name, by_level in ratios.items():
        print(f"{name}: " + ", ".join(f"c={c}: {ratio:.2f}x the best peer ({best[c]})" for c, ratio in by_level.items()))
    return {"servers": rows, "best_peer": best, "over_best_peer": ratios}


def run_protocol(args, workdir: Path) -> dict:
    """The Open Inference Protocol's binary `image` path (the peers' `triton` client flavour, as PyTriton is
    driven) against `/predict` on the same `skin-ray serve`, and PyTriton with that same client, in one round."""
    rows = peer_rows(args, workdir, "pytriton")
    port = free_port()
    command, env = servers(args.bundle, workdir)[SHIPPED]
    with Server(command(port), f"http://127.0.0.1:{port}/healthz", env):
        base = f"http://127.0.0.1:{port}"
        rows[f"{SHIPPED}, /predict"] = load(f"{base}/predict", args.concurrency, args.seconds)
        rows[f"{SHIPPED}, /v2 infer (binary)"] = load(base, args.concurrency, args.seconds, triton_model="skin-ray")
    print(table(rows, args.concurrency, rows[f"{SHIPPED}, /predict"][args.concurrency[-1]]["rps"], "/predict"))
    protocol, multipart = rows[f"{SHIPPED}, /v2 infer (binary)"], rows[f"{SHIPPED}, /predict"]
    ratios = {c: {"over_predict": round(protocol[c]["rps"] / multipart[c]["rps"], 3),
                  "over_pytriton": round(protocol[c]["rps"] / rows["pytriton"][c]["rps"], 3) if "pytriton" in rows else None}
              for c in args.concurrency}
    print("the protocol's binary path per concurrency: " + ", ".join(
        f"c={c}: {r['over_predict']:.3f}x /predict, {r['over_pytriton']}x PyTriton" for c, r in ratios.items()))
    return {"servers": rows, "ratios": ratios}


def compare_arms(args, images: list[bytes], workdir: Path, arms: dict[str, tuple[list[str], dict | None]],
                 rounds: int = 2) -> dict[str, list[float]]:
    """`skin-ray serve` as shipped with each arm's extra flags, in rounds whose order alternates (an arm run
    after another may find the machine busier: each is first as often as last), each at 64 clients keeping one
    `/predict/batch` of one image in flight with the arm's headers (this client can send headers; the peers'
    cannot); img/s per arm and round."""
    command, env = servers(args.bundle, workdir)[SHIPPED]
    measured: dict[str, list[float]] = {name: [] for name in arms}
    for round_number in range(rounds):
        order = list(arms.items()) if round_number % 2 == 0 else list(arms.items())[::-1]
        for name, (flags, headers) in order:
            port = free_port()
            with Server([*command(port), *flags], f"http://127.0.0.1:{port}/healthz", env):
                url = f"http://127.0.0.1:{port}/predict/batch"
                load_batches(url, images, 1, 64, 5, headers)  # warm-up
                result = load_batches(url, images, 1, 64, args.seconds, headers)
                assert not result["errors"], result
                measured[name].append(result["images_per_s"])
    return measured


def run_keys(args, images: list[bytes], workdir: Path) -> dict:
    """The shipped service without and with API keys (one key, sent as a bearer token)."""
    keys = workdir / "api-keys"
    secret = "benchmark-secret-0123456789"
    keys.write_text(f"bench:{secret}\n")
    arms = {"keys off": ([], None), "keys on": (["--api-keys", str(keys)], {"Authorization": f"Bearer {secret}"})}
    measured = compare_arms(args, images, workdir, arms)
    ratio = float(np.mean(measured["keys on"]) / np.mean(measured["keys off"]))
    print(f"64 clients, img/s per round: keys off {measured['keys off']}, keys on {measured['keys on']}; "
          f"keys on / keys off {ratio:.3f}")
    return {"keys": measured, "keys_on_over_off": round(ratio, 3)}


def run_audit(args, images: list[bytes], workdir: Path) -> dict:
    """The shipped service with neither the drift windows nor the audit trail, with the drift windows (on by
    default), and with both (the audit to a local folder)."""
    arms = {
        "plain": (["--drift-window", "0"], None),
        "drift": ([], None),
        "drift and audit": (["--audit", str(workdir / "audit")], None),
    }
    measured = compare_arms(args, images, workdir, arms, rounds=4)
    mean = {name: float(np.mean(rounds)) for name, rounds in measured.items()}
    ratios = {"drift_over_plain": mean["drift"] / mean["plain"], "audit_over_drift": mean["drift and audit"] / mean["drift"],
              "both_over_plain": mean["drift and audit"] / mean["plain"]}
    lines = sum(len(path.read_text().splitlines()) for path in (workdir / "audit").glob("audit-*.jsonl"))
    print(f"64 clients, img/s per round: {measured}; " + ", ".join(f"{name} {ratio:.3f}" for name, ratio in ratios.items())
          + f" ({lines} audit lines written)")
    return {"images_per_s": measured, **{name: round(ratio, 3) for name, ratio in ratios.items()}, "audit_lines": lines}


def run_explain_load(args, images: list[bytes], workdir: Path, explainers: int = 32, predictors: int = 4) -> dict:
    """`/predict`'s latency with `predictors` clients alone, then with `explainers` clients keeping `/explain` busy
    beside them (the service answers explanations beyond its bound with 503; a client waits its Retry-After, as
    HTTP clients do), in one service."""
    import aiohttp

    async def closed_loop(session, url: str, clients: int, seconds: float, latencies: list | None) -> int:
        answered = 0
        deadline = time.perf_counter() + seconds

        async def client(offset: int):
            nonlocal answered
            while time.perf_counter() < deadline:
                form = aiohttp.FormData()
                form.add_field("file", images[offset % len(images)], filename="x.jpg", content_type="image/jpeg")
                started = time.perf_counter()
                try:
                    async with session.post(url, data=form) as response:
                        await response.read()
                        status = response.status
                except aiohttp.ClientPayloadError:  # a refusal before the upload ended, its connection closed
                    status = 503
                answered += status == 200
                if latencies is not None and status == 200:
                    latencies.append(time.perf_counter() - started)
                if status == 503:
                    await asyncio.sleep(1)  # the service's Retry-After

        await asyncio.gather(*(client(k) for k in range(clients)))
        return answered

    async def measure(base: str) -> dict:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            await closed_loop(session, f"{base}/predict", predictors, 5, None)  # warm-up
            alone: list[float] = []
            await closed_loop(session, f"{base}/predict", predictors, args.seconds, alone)
            beside: list[float] = []
            _, explained = await asyncio.gather(
                closed_loop(session, f"{base}/predict", predictors, args.seconds, beside),
                closed_loop(session, f"{base}/explain", explainers, args.seconds, None),
            )
        p50 = lambda values: round(1000 * float(np.median(values)), 1)  # noqa: E731
        return {"predict_p50_ms_alone": p50(alone), "predict_p50_ms_beside_explain": p50(beside),
                "explanations_answered": explained, "ratio": round(p50(beside) / p50(alone), 2)}

    port = free_port()
    command, env = servers(args.bundle, workdir)[SHIPPED]
    with Server(command(port), f"http://127.0.0.1:{port}/healthz", env):
        result = asyncio.run(measure(f"http://127.0.0.1:{port}"))
    print(f"/predict p50 with {predictors} clients: {result['predict_p50_ms_alone']} ms alone, "
          f"{result['predict_p50_ms_beside_explain']} ms beside {explainers} /explain clients ({result['ratio']}x; "
          f"{result['explanations_answered']} explanations made)")
    return result


# Which process a command line belongs to, first match wins: Ray names its workers after their actor class.
PROCESS_KINDS = (
    ("Ingress replica", "ServeReplica"), ("Serve controller", "ServeController"), ("Serve proxy", "ProxyActor"),
    ("HAProxy", "haproxy"), ("GCS", "gcs_server"), ("raylet", "raylet"), ("dashboard", "dashboard/dashboard.py"),
    ("dashboard agent", "dashboard/agent.py"), ("runtime env agent", "runtime_env/agent"), ("log monitor", "log_monitor"),
    ("autoscaler monitor", "autoscaler/_private/monitor"), ("skin-ray serve (driver)", "skin-ray serve"),
    ("other Ray workers", "ray::"),
)


def cpu_seconds_by_kind() -> dict[str, float]:
    """User and system CPU seconds so far of every process on the machine that is one of PROCESS_KINDS."""
    import psutil

    seconds: dict[str, float] = {}
    for process in psutil.process_iter(["cmdline", "cpu_times"]):
        cmdline, times = " ".join(process.info["cmdline"] or []), process.info["cpu_times"]
        kind = next((kind for kind, marker in PROCESS_KINDS if marker in cmdline), None)
        if kind and times:
            seconds[kind] = seconds.get(kind, 0.0) + times.user + times.system
    return seconds


def run_cpu_by_process(args, workdir: Path) -> dict:
    """The shipped service under the peers' client at the last --concurrency: CPU milliseconds per image answered
    of each kind of process (PROCESS_KINDS), and the share of the machine's CPU time they add up to. The client
    (a process of its own, gone when its CPU time would be read) is not counted."""
    clients = args.concurrency[-1]
    port = free_port()
    command, env = servers(args.bundle, workdir)[SHIPPED]
    with Server(command(port), f"http://127.0.0.1:{port}/healthz", env):
        load(f"http://127.0.0.1:{port}/predict", [clients], 5)  # warm-up
        before, started = cpu_seconds_by_kind(), time.perf_counter()
        level = load(f"http://127.0.0.1:{port}/predict", [clients], args.seconds)[clients]
        after, elapsed = cpu_seconds_by_kind(), time.perf_counter() - started
    images = level["rps"] * args.seconds
    per_image = {kind: round(1000 * (after[kind] - before.get(kind, 0.0)) / images, 2) for kind in after}
    per_image = dict(sorted(per_image.items(), key=lambda item: -item[1]))
    busy = sum(after[kind] - before.get(kind, 0.0) for kind in after) / (elapsed * (os.cpu_count() or 1))
    print(f"{clients} clients, {level['rps']} img/s: CPU ms per image " + ", ".join(f"{k} {v}" for k, v in per_image.items())
          + f"; these processes used {busy:.0%} of the machine's CPU time")
    return {"clients": clients, "images_per_s": level["rps"], "cpu_ms_per_image": per_image, "machine_share": round(busy, 3)}


def run_versions(args, workdir: Path, rounds: int = 2) -> dict:
    """`skin-ray serve` with one bundle, with two (the same bundle twice) split 90/10, and with one plus a 100%
    shadow, in alternating rounds at each concurrency; with --baseline-checkout, the one-bundle service of that
    checkout too (e.g. a worktree of the previous commit)."""
    bundle = args.bundle or str(ROOT / "skin_ray" / "bundles" / "default")
    arms = {
        "one bundle": (["--bundle", bundle], {}),
        "two bundles 90/10": (["--bundle", f"stable={bundle}", "--bundle", f"canary={bundle}",
                               "--traffic", "stable=90,canary=10"], {}),
        "one bundle + 100% shadow": (["--bundle", f"stable={bundle}", "--bundle", f"shadow={bundle}", "--shadow", "shadow"], {}),
    }
    if args.baseline_checkout:  # run from there: a local Ray puts its driver's folder first on its workers' path
        arms["one bundle, baseline checkout"] = (["--bundle", bundle], {"PYTHONPATH": args.baseline_checkout})
    measured: dict[str, list[dict]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, (flags, env) in arms.items():
            port = free_port()
            command = ["skin-ray", "serve", "--port", str(port), *flags]
            cwd = Path(env.get("PYTHONPATH", ROOT))
            with Server(command, f"http://127.0.0.1:{port}/healthz", env, cwd):
                measured[name].append(load(f"http://127.0.0.1:{port}/predict", args.concurrency, args.seconds))
                print(json.dumps({"arm": name, "levels": measured[name][-1]}), flush=True)  # kept if a later arm fails
    rows = {
        name: {c: {**{key: float(np.mean([run[c][key] for run in runs])) for key in ("rps", "p50_ms", "p99_ms")},
                   "errors": [run[c]["errors"] for run in runs if run[c]["errors"]]}
               for c in args.concurrency}
        for name, runs in measured.items()
    }
    print(table(rows, args.concurrency, rows["one bundle"][args.concurrency[-1]]["rps"], "one bundle"))
    return {"servers": rows, "rounds": measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="bundle (default: the shipped model)")
    parser.add_argument("--seconds", type=float, default=15, help="load time per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--peers", action="store_true", help="measure the peers of ../shared/peers instead of our layouts")
    parser.add_argument("--peers-only", default="mosec,litserve,pytriton,bentoml,fastapi-pob", help="peers to run")
    parser.add_argument("--keys", action="store_true", help="the shipped service without and with API keys instead")
    parser.add_argument("--explain-load", action="store_true", help="/predict's latency alone and beside /explain clients")
    parser.add_argument(
        "--audit", action="store_true", help="the shipped service plain, with drift windows, and with them and the audit trail"
    )
    parser.add_argument("--versions", action="store_true", help="one bundle against two at 90/10 and a 100%% shadow")
    parser.add_argument("--protocol", action="store_true", help="the Open Inference Protocol's binary path, /predict, PyTriton")
    parser.add_argument("--cpu-by-process", action="store_true", help="CPU per image of each process of the shipped service")
    parser.add_argument("--baseline-checkout", help="with --versions: also the one-bundle service of this checkout")
    args = parser.parse_args()
    if not LOADGEN.is_file() or not IMAGES.is_dir():
        sys.exit(f"needs the peers' client {LOADGEN} and the images in {IMAGES}")
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-bench-{os.getpid()}"
    workdir.mkdir(parents=True)
    images = [path.read_bytes() for path in sorted(IMAGES.glob("*.jpg"))[:256]]
    if args.keys:
        report = run_keys(args, images, workdir)
    elif args.audit:
        report = run_audit(args, images, workdir)
    elif args.explain_load:
        report = run_explain_load(args, images, workdir)
    elif args.versions:
        report = run_versions(args, workdir)
    elif args.protocol:
        report = run_protocol(args, workdir)
    elif args.cpu_by_process:
        report = run_cpu_by_process(args, workdir)
    else:
        report = run_peers(args, workdir) if args.peers else run_layouts(args, images, workdir)
    print(json.dumps({"benchmark": "serve", "seconds": args.seconds, "cpus": os.cpu_count(), **report}))


if __name__ == "__main__":
    main()
