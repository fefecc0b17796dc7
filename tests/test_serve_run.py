"""The service started as users start it: Ray's `serve run` on our YAML, `skin-ray serve`, and the page
driven in a real headless Chromium. Most subprocesses join the session's Ray through RAY_ADDRESS; the stop
and side-by-side tests start commands on Rays of their own, as a user in a fresh terminal does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from ray import serve

from skin_ray.gate_images import documents
from skin_ray.onnx_analysis import RUNTIME
from skin_ray.testing import encode, free_port, lesion_image, own_ray_environment, round_lesion_photo, steady_load, wait_healthy

pytestmark = pytest.mark.ray  # every test here runs `skin-ray` (TensorFlow, and Ray for most) in a subprocess

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _start(command: list[str], ray_session) -> subprocess.Popen:
    """`command` joined to the session's Ray as from a terminal: Ctrl-C (SIGINT) reaches it even when the tests
    run as a background job, whose children inherit an ignored SIGINT (`serve run`, which installs no handler of
    its own, then never stopped). Its output goes to a file (`_output`): `serve run` relays the logs of every
    worker of the session's Ray, more than a pipe nobody reads holds."""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    output = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        command, env=env, stdout=output, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    process.output = output
    return process


def _output(process: subprocess.Popen) -> str:
    process.output.seek(0)
    return process.output.read()


def _stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        said = _output(process)[-6000:]
        raise AssertionError(f"{process.args} did not stop within 120 s of SIGINT; it said:\n{said}") from None
    finally:
        if process.poll() is None:
            process.kill()
        serve.shutdown()  # the Serve instance outlives the CLI in the session's Ray; free its CPUs and port


def _photo(tmp_path: Path) -> Path:
    path = tmp_path / "lesion.jpg"
    path.write_bytes(round_lesion_photo())  # one the shipped model's input gate accepts
    return path


def test_serve_run_with_the_shipped_config(ray_session, tmp_path):
    """`serve run deployments/serve_config.yaml` as written, on a free port, serving the shipped model."""
    config = yaml.safe_load((ROOT / "deployments" / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    copy = tmp_path / "serve_config.yaml"
    copy.write_text(yaml.safe_dump(config))
    process = _start(["serve", "run", str(copy)], ray_session)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        response = httpx.post(f"{url}/predict", files={"file": ("x.jpg", _photo(tmp_path).read_bytes(), "image/jpeg")})
        assert response.status_code == 200, response.text
        assert response.json()["label"] in ("Cancer", "Non_Cancer")
        assert httpx.get(f"{url}/model").json()["runtime_in_use"] == RUNTIME  # the shipped bundle carries one
    finally:
        _stop(process)


@pytest.fixture
def no_serve_in_session_ray():
    """A Serve of the tests' own Ray would hold HAProxy's fixed ports (9101, 8404) that another Serve needs."""
    import ray

    if ray.is_initialized():
        serve.shutdown()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_lets_every_received_request_finish(no_serve_in_session_ray, signum):
    """`skin-ray serve` on its own Ray under 8 steady clients gets SIGINT (Ctrl-C) or SIGTERM (a pod stop):
    every request sent before the signal gets its real answer, later ones a JSON 503 with Retry-After or a
    refused connection, never a 404 or a 500, and the process exits 0."""
    import asyncio

    port = free_port()
    process = subprocess.Popen(
        ["skin-ray", "serve", "--port", str(port)], env=own_ray_environment(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    answers: list = []
    signalled = []

    async def load_and_stop():
        loading = asyncio.ensure_future(steady_load(url, round_lesion_photo(), 8, lambda: process.poll() is not None, answers))
        await asyncio.sleep(3)
        signalled.append(time.monotonic())
        process.send_signal(signum)
        await loading

    try:
        wait_healthy(url, process)
        asyncio.run(asyncio.wait_for(load_and_stop(), 120))
        assert process.wait(timeout=60) == 0, process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
    before = [status for sent, status, _ in answers if sent < signalled[0]]
    assert before and set(before) == {200}, before
    for sent, status, response in answers:
        if sent >= signalled[0] and status == 503:
            assert response.json()["detail"] and response.headers["retry-after"]
        elif sent >= signalled[0]:
            assert status == 200 or isinstance(status, str), status  # answered, or the connection was refused
    assert "stopping" in process.stdout.read()


def test_serve_and_classify_side_by_side_each_on_a_ray_of_its_own(no_serve_in_session_ray, untrained_bundle, tmp_path):
    """`skin-ray serve` and `skin-ray classify` started in two terminals: each starts its own Ray rather than
    joining the other's, so stopping the service mid-job leaves the job running to its last row."""
    rng = np.random.default_rng(21)
    source = tmp_path / "photos"
    source.mkdir()
    for i in range(600):
        (source / f"{i:03d}.jpg").write_bytes(encode(lesion_image(("Cancer", "Non_Cancer")[i % 2], rng, size=100), "JPEG"))
    port = free_port()
    service = subprocess.Popen(
        ["skin-ray", "serve", "--port", str(port), "--bundle", str(untrained_bundle)], env=own_ray_environment(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    job = None
    try:
        wait_healthy(f"http://127.0.0.1:{port}", service)
        output = tmp_path / "results"
        job = subprocess.Popen(
            ["skin-ray", "classify", str(source), "--output", str(output), "--bundle", str(untrained_bundle),
             "--flush-interval-s", "0.5", "--verbose"],
            env=own_ray_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        deadline = time.monotonic() + 240
        while not list(output.glob("*.parquet")) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        service.send_signal(signal.SIGTERM)
        try:
            stopped = service.wait(timeout=120)
        except subprocess.TimeoutExpired:  # say what the service printed, not only that it did not stop
            service.kill()
            stopped = None
        assert stopped == 0, service.stdout.read()
        assert job.poll() is None, "the job ended before the service stopped: nothing was tested"
        stdout, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr[-3000:]
        assert "started a Ray of this command's own" in stderr
        summary = json.loads(stdout)
        assert summary["rows"] == summary["files"] == summary["classified"] == 600
    finally:
        for process in (service, job):
            if process is not None and process.poll() is None:
                process.kill()


def test_two_services_on_one_machine_each_serve_a_bundle_at_its_size(no_serve_in_session_ray, small_input_bundle):
    """Two `skin-ray serve` of a 96-pixel bundle started together on one machine, one per layout: both serve (Ray's
    HAProxy no longer takes its fixed stats and exporter ports, 8404 and 9101, which made the second fail), and
    the Ingress decodes uploads to the bundle's size, also in the split layout, where it does not hold the model
    (a 170-pixel batch would fail in the network)."""
    import psutil

    services = {}
    try:
        for layout in ("fused", "split"):
            port = free_port()
            services[layout] = (f"http://127.0.0.1:{port}", subprocess.Popen(
                ["skin-ray", "serve", "--port", str(port), "--bundle", str(small_input_bundle), "--layout", layout],
                env=own_ray_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            ))
        rng = np.random.default_rng(5)
        photos = [encode(lesion_image(label, rng, size=300), "JPEG") for label in ("Cancer", "Non_Cancer")]
        for url, process in services.values():
            wait_healthy(url, process)
        listening = {c.laddr.port for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        assert not {8404, 9101} & listening
        for url, _ in services.values():
            assert httpx.get(f"{url}/model").json()["input_size"] == [96, 96, 3]
            single = httpx.post(f"{url}/predict", files={"file": ("a.jpg", photos[0], "image/jpeg")}, timeout=60)
            assert single.status_code == 200, single.text
            assert single.json()["model_version"] == "untrained-96-test"
            files = [("files", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(photos)]
            batch = httpx.post(f"{url}/predict/batch", files=files, timeout=60)
            assert batch.status_code == 200, batch.text
            assert [result["model_version"] for result in batch.json()["results"]] == ["untrained-96-test"] * 2
        for _, process in services.values():
            process.send_signal(signal.SIGTERM)
        for _, process in services.values():
            assert process.wait(timeout=120) == 0, process.stdout.read()
    finally:
        for _, process in services.values():
            if process.poll() is None:
                process.kill()


def test_serve_beyond_loopback_needs_api_keys_or_says_so(tmp_path):
    """Without keys `skin-ray serve` binds loopback; on another address it refuses to start, in one line and
    before Ray starts, unless --allow-unauthenticated; a key file it cannot use is refused the same way."""
    started = time.monotonic()
    refused = subprocess.run(["skin-ray", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
                             capture_output=True, text=True, timeout=120, env=own_ray_environment())
    assert refused.returncode == 2 and "refusing to serve on 0.0.0.0 without API keys" in refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    keys = tmp_path / "keys"
    keys.write_text("clinic:short\n")
    broken = subprocess.run(["skin-ray", "serve", "--host", "0.0.0.0", "--api-keys", str(keys)],
                            capture_output=True, text=True, timeout=120, env=own_ray_environment())
    assert broken.returncode == 2 and "line 1: the secret of 'clinic' is shorter than 16" in broken.stderr
    assert "short" not in broken.stderr.replace("shorter", "")  # the secret itself is never printed
    assert time.monotonic() - started < 60


@pytest.fixture(scope="module")
def cli_service(ray_session):
    """`skin-ray serve` as a user starts it: the shipped model, with its input gate."""
    port = free_port()
    process = _start(["skin-ray", "serve", "--port", str(port)], ray_session)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process)
    yield url, process
    if process.poll() is None:
        _stop(process)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (.ci/run installs it)")
def test_upload_page_in_headless_chromium(cli_service, tmp_path):
    from playwright.sync_api import sync_playwright

    url, _ = cli_service
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        try:
            page = browser.new_page()
            page.goto(url + "/")
            assert "not a medical diagnosis" in page.inner_text("#disclaimer")
            page.set_input_files("#file", str(_photo(tmp_path)))
            page.wait_for_selector("#label", timeout=60_000)
            assert page.inner_text("#label") in ("Cancer", "Not cancer")  # never the bundle's "Non_Cancer"
            assert page.inner_text("#probability").startswith("Probability of cancer: ")
            page.wait_for_selector("#preview", state="visible")
            # One click shows what moved the prediction, over the photo.
            page.click("#explain")
            page.wait_for_selector("#overlay", state="visible", timeout=60_000)
            assert page.evaluate("document.getElementById('overlay').naturalWidth") == 400  # the photo's own size
            assert page.inner_text("#overlay-caption").startswith("Brighter areas moved the model most")
            page.screenshot(path=str(tmp_path / "page.png"))
            # A page of text is refused by the input gate: said plainly, with no label or probability.
            text_page = tmp_path / "page-of-text.jpg"
            text_page.write_bytes(encode(documents(np.random.default_rng(1), 1)[0]))
            page.set_input_files("#file", str(text_page))
            page.wait_for_selector("#refused", timeout=60_000)
            assert "not like the dermoscopic images this model knows" in page.inner_text("#refused")
            assert not page.is_visible("#label") and not page.is_visible("#probability")
            # An uncertain answer (the service's answer replaced, so the rendering is what is tested) asks for a specialist.
            uncertain = {
                "label": "Cancer", "cancer_probability": 0.55, "probabilities": {"Cancer": 0.55, "Non_Cancer": 0.45},
                "threshold": 0.51, "in_distribution": True, "ood_score": 50.0, "uncertain": True,
                "member_probabilities": [0.3, 0.8], "error": None, "error_reason": None, "model_version": "m",
            }
            page.route("**/predict", lambda route: route.fulfill(json=uncertain))
            page.set_input_files("#file", str(_photo(tmp_path)))
            page.wait_for_selector("#uncertain", timeout=60_000)
            assert page.inner_text("#uncertain") == "Uncertain: a specialist should look. Its 2 networks say 30.0%, 80.0%."
            page.unroute("**/predict")
            assert page.evaluate("[percent(2.7e-5), percent(0.5), percent(0.99995)]") == [
                "less than 0.1%", "50.0%", "more than 99.9%",
            ]
            # A broken "JPEG": the plain-language meaning and the service's reason, no preview, page still works.
            broken = tmp_path / "broken.jpg"
            broken.write_bytes(b"not really a jpeg")
            page.set_input_files("#file", str(broken))
            page.wait_for_selector("#error", timeout=60_000)
            assert page.inner_text("#error").startswith("This file could not be read as a picture.")
            assert "not_an_image" in page.inner_text("#error")
            assert not page.is_visible("#preview")
            # A text file is refused as not a picture (415), again without a broken-image preview.
            notes = tmp_path / "notes.txt"
            notes.write_text("a text file")
            page.set_input_files("#file", str(notes))
            page.wait_for_function("document.querySelector('#error')?.textContent.startsWith('This file is not a picture')")
            assert not page.is_visible("#preview")
            # Dropped onto the page, a photo is classified like a chosen one.
            photo = list(_photo(tmp_path).read_bytes())
            page.evaluate(
                """(bytes) => {
                    const transfer = new DataTransfer();
                    transfer.items.add(new File([new Uint8Array(bytes)], "dropped.jpg", { type: "image/jpeg" }));
                    document.getElementById("drop").dispatchEvent(
                        new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
                }""",
                photo,
            )
            page.wait_for_selector("#label", timeout=60_000)
            page.wait_for_selector("#preview", state="visible")
            # The API documentation is one click away and renders without internet.
            page.click("text=HTTP API")
            page.wait_for_selector(".swagger-ui .title", timeout=60_000)
            assert "skin-ray" in page.inner_text(".swagger-ui .title")
            assert page.get_by_text("/predict/batch", exact=True).first.is_visible()
        finally:
            browser.close()


def test_ctrl_c_stops_the_service_cleanly(cli_service):
    url, process = cli_service
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/model").json()["runtime_in_use"] == RUNTIME
    assert _stop(process) == 0
    assert "stopping" in _output(process)
