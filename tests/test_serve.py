"""The Serve app on a real local Ray, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image
from ray import serve
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance, response_schema_conformance, status_code_conformance

from skin_ray.config import ServeSettings
from skin_ray.optimize import BOUNDS
from skin_ray.predictor import Predictor
from skin_ray.preprocess import preprocess_image
from skin_ray.record import RECORD_FIELDS
from skin_ray.serve import app_builder
from skin_ray.serve.backends import LoadedModel, swap_in_place
from skin_ray.serve.deployments import Ingress, SkinModel
from skin_ray.testing import encode, free_port, lesion_image, steady_load, wait_healthy

# How far one image's probability may move when the same network sees it in a batch of another size: the bound the
# project allows any runtime (oneDNN chooses kernels by batch shape; on an AVX-512 CPU they moved up to 1.6e-4).
OTHER_BATCH_ATOL = BOUNDS["max_abs_dp"]

APP = "skin-ray-test"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def service(ray_session, untrained_bundle):
    """The app with a small upload limit and batches that wait long enough to fill under load."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings(bundle=str(untrained_bundle), max_batch_size=16, batch_wait_timeout_s=0.05, max_upload_mb=2)
    serve.run(app_builder(settings), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()  # frees the replicas' CPUs for the tests that follow


@pytest.fixture
def client(service):
    with httpx.Client(base_url=service, timeout=60) as http:
        yield http
        assert http.get("/healthz").status_code == 200, "the service must stay healthy after every request"


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return encode(lesion_image("Cancer", np.random.default_rng(5)), "JPEG")


def test_model_description_names_each_data_tree_not_its_location():
    """GET /model keeps the per-tree figures but says "ham10000", not where the training data lives."""
    from dataclasses import asdict

    from skin_ray.bundle import read_metadata
    from skin_ray.serve.backends import PUBLIC_METADATA, named_trees

    figures = {"source": {"/data/x/ham10000": {"n": 3}}, "within": {"s3://b/skin_isic": {"cancers": 1}},
               "of": ["/data/x/ham10000"]}
    assert named_trees(figures, ["/data/x/ham10000", "s3://b/skin_isic"]) == {
        "source": {"ham10000": {"n": 3}}, "within": {"skin_isic": {"cancers": 1}}, "of": ["ham10000"]}
    shipped = asdict(read_metadata())
    trees = shipped["data"]["sources"]
    public = json.dumps(named_trees({name: shipped[name] for name in PUBLIC_METADATA}, trees))
    assert len(trees) == 2 and not any(tree in public for tree in trees) and '"ham10000"' in public


def _post(client, data: bytes, filename="x.jpg", content_type="image/jpeg"):
    return client.post("/predict", files={"file": (filename, data, content_type)})


def test_endpoints(client, jpeg):
    assert client.get("/healthz").json()["model_version"] == "untrained-test"
    metadata = client.get("/model").json()
    assert metadata["class_names"] == ["Cancer", "Non_Cancer"] and metadata["positive_class"] == "Cancer"
    assert metadata["input_size"] == [170, 170, 3] and not {"training", "data"} & set(metadata)  # no storage paths
    assert "/predict/batch" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "not a medical diagnosis" in page.text
    response = _post(client, jpeg)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == set(RECORD_FIELDS)
    assert answer["probabilities"]["Cancer"] == pytest.approx(answer["cancer_probability"])
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert answer["label"] == ("Cancer" if answer["cancer_probability"] >= answer["threshold"] else "Non_Cancer")


def test_page_is_self_contained(client):
    page = client.get("/").text
    assert "<script src" not in page and "<link" not in page and "https://" not in page


def _odd_images() -> dict[str, tuple[bytes, str]]:
    photo = lesion_image("Non_Cancer", np.random.default_rng(6), size=120)
    exif = Image.Exif()
    exif[0x0112] = 6
    sixteen_bit = Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257))
    return {
        "grayscale": (encode(photo.convert("L"), "PNG"), "image/png"),
        "rgba": (encode(photo.convert("RGBA"), "PNG"), "image/png"),
        "cmyk": (encode(photo.convert("CMYK"), "JPEG"), "image/jpeg"),
        "16-bit png": (encode(sixteen_bit, "PNG"), "image/png"),
        "palette gif": (encode(photo.convert("P"), "GIF"), "image/gif"),
        "webp": (encode(photo, "WEBP"), "image/webp"),
        "bmp": (encode(photo, "BMP"), "image/bmp"),
        "tiff": (encode(photo, "TIFF"), "image/tiff"),
        "1x1": (encode(Image.new("RGB", (1, 1), (120, 80, 60)), "PNG"), "image/png"),
        "exif rotated": (encode(photo, "JPEG", exif=exif.tobytes()), "image/jpeg"),
        "4000x3000": (encode(photo.resize((4000, 3000)), "JPEG", quality=85), "image/jpeg"),
        "undeclared type": (encode(photo, "PNG"), "application/octet-stream"),
    }


@pytest.mark.parametrize("name", list(_odd_images()))
def test_odd_but_valid_images_are_predicted(client, name):
    data, content_type = _odd_images()[name]
    response = _post(client, data, f"{name}.img", content_type)
    assert response.status_code == 200, response.text
    assert 0.0 <= response.json()["cancer_probability"] <= 1.0


def _bad_uploads(jpeg: bytes) -> dict[str, tuple[dict, int, str]]:
    bomb = encode(Image.new("1", (20000, 20000)), "PNG")
    return {
        "empty": ({"files": {"file": ("e.jpg", b"", "image/jpeg")}}, 400, "empty"),
        "truncated jpeg": ({"files": {"file": ("t.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}}, 400, "truncated"),
        "text as image": ({"files": {"file": ("t.jpg", b"hello " * 100, "image/jpeg")}}, 400, "not_an_image"),
        "random bytes": ({"files": {"file": ("r.jpg", np.random.default_rng(1).bytes(4096), "image/jpeg")}}, 400, "not_an_image"),
        "decompression bomb": ({"files": {"file": ("b.png", bomb, "image/png")}}, 400, "too_many_pixels"),
        "oversize body": ({"files": {"file": ("big.jpg", b"\xff" * (3 * 2**20), "image/jpeg")}}, 413, "larger than"),
        "wrong content type": ({"files": {"file": ("a.txt", b"plain text", "text/plain")}}, 415, "text/plain"),
        "no file": ({"data": {"other": "field"}}, 422, "no file"),
        "not multipart": ({"content": b"{}", "headers": {"content-type": "application/json"}}, 422, "no file"),
        "broken multipart": (
            {"content": b"--xyz\r\nnonsense", "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
            422,
            "no file",
        ),
    }


@pytest.mark.parametrize("name", list(_bad_uploads(b"\xff\xd8")))
def test_bad_uploads_get_a_4xx_with_a_reason(client, jpeg, name):
    request, status, reason = _bad_uploads(jpeg)[name]
    response = client.post("/predict", **request)
    assert response.status_code == status, response.text
    assert reason in response.json()["detail"]


def test_oversize_body_without_content_length_is_refused_while_streaming(client):
    def chunks():
        boundary = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\n"
        yield boundary + b"Content-Type: image/jpeg\r\n\r\n"
        for _ in range(64):
            yield b"\x00" * 2**16  # 4 MiB in all, no Content-Length header (chunked)

    response = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413


def test_batch_endpoint_keeps_order_and_isolates_bad_files(client, jpeg):
    files = [
        ("files", ("a.jpg", jpeg, "image/jpeg")),
        ("files", ("broken.jpg", b"nope", "image/jpeg")),
        ("files", ("c.png", _odd_images()["grayscale"][0], "image/png")),
        ("files", ("d.txt", b"text", "text/plain")),
    ]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["a.jpg", "broken.jpg", "c.png", "d.txt"]
    assert "label" in results[0] and "label" in results[2]
    assert results[1]["error"].startswith("not_an_image") and "text/plain" in results[3]["error"]
    too_many = client.post("/predict/batch", files=[("files", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(17)])
    assert too_many.status_code == 413


def test_batches_form_under_concurrent_load(service, client, jpeg):
    """48 requests at once share batches: the Batcher waits for images still decoding (a timer-only batcher
    fed one image at a time formed batches of 1-2 here)."""
    before = client.get("/stats").json()["batch_sizes"]

    async def burst():
        async with httpx.AsyncClient(base_url=service, timeout=120) as http:
            return await asyncio.gather(
                *(http.post("/predict", files={"file": ("x.jpg", jpeg, "image/jpeg")}) for _ in range(48))
            )

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    after = client.get("/stats").json()["batch_sizes"]
    new_batches = {int(size): count - before.get(size, 0) for size, count in after.items() if count > before.get(size, 0)}
    assert sum(size * count for size, count in new_batches.items()) == 48
    assert max(new_batches) >= 8, new_batches


@pytest.fixture(scope="module")
def split_service(service, optimized_bundle):
    """The same app in the split layout (Ingress -> SkinModel), beside the fused one, its bundle carrying the faster
    runtime."""
    settings = ServeSettings(bundle=str(optimized_bundle), layout="split", max_batch_size=16, batch_wait_timeout_s=0.05)
    serve.run(app_builder(settings), name="split", route_prefix="/split")
    yield f"{service}/split"
    serve.delete("split")


@pytest.mark.ray  # its service fixture is chosen at run time, so the fixture-based mark cannot see it
@pytest.mark.parametrize("layout", ["fused", "split"])
def test_served_probabilities_equal_the_predictor_on_the_same_files(request, layout):
    """Batching, the uint8 hop and the threads change nothing: each answer is Predictor's on that file, by the same
    runtime (the Keras network fused, the bundle's faster runtime split)."""
    url = request.getfixturevalue("service" if layout == "fused" else "split_service")
    bundle = request.getfixturevalue("untrained_bundle" if layout == "fused" else "optimized_bundle")
    rng = np.random.default_rng(11)
    files = [encode(lesion_image(("Cancer", "Non_Cancer")[i % 2], rng, size=150 + 10 * i), "JPEG") for i in range(12)]
    predictor = Predictor.from_bundle(str(bundle))
    assert httpx.get(f"{url}/model").json()["runtime_in_use"] == predictor.analyse.runtime
    assert predictor.analyse.runtime == ("keras-float32" if layout == "fused" else "onnxruntime-float32")
    expected = predictor.predict_arrays(np.stack([preprocess_image(data, predictor.metadata.image_size) for data in files]))[:, 0]

    async def concurrently():  # so that the files share batches
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(
                *(http.post(f"{url}/predict", files={"file": (f"{i}.jpg", data, "image/jpeg")}) for i, data in enumerate(files))
            )

    served = [response.json()["cancer_probability"] for response in asyncio.run(concurrently())]
    np.testing.assert_allclose(served, expected, atol=OTHER_BATCH_ATOL)


SPLIT_INGRESS_IMPORTS = """
import sys
from skin_ray.bundle import read_drift_reference, read_metadata
from skin_ray.config import ServeSettings
from skin_ray.serve import app_builder
app_builder(ServeSettings(layout="split"))
read_metadata(None), read_drift_reference(None)
print(" ".join(sorted({name.split(".")[0] for name in sys.modules} & {"keras", "tensorflow", "onnxruntime", "ray"})))
"""


def test_the_split_layouts_ingress_runs_without_tensorflow():
    """What the split layout's Ingress imports and reads (the app, the bundle's description and drift reference)
    loads neither TensorFlow nor a runtime: decoding replicas stay small and start fast."""
    result = subprocess.run([sys.executable, "-c", SPLIT_INGRESS_IMPORTS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ray"], result.stdout  # Ray Serve is there: the check sees what was imported


def test_a_swap_to_a_bundle_of_another_input_size_is_refused(small_input_bundle, untrained_bundle):
    """A split layout's Ingress decodes to the size of the SkinModel bundle it started with, so a swap there may
    not change it."""
    with pytest.raises(ValueError, match="deploy the app anew to change the input size"):
        swap_in_place(LoadedModel(str(small_input_bundle), "auto"), str(untrained_bundle))


def test_docs_work_offline(client):
    """/docs loads its script and style from the service itself, never from a CDN."""
    page = client.get("/docs").text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert assets and not [url for url in assets if "//" in url], assets
    for url in assets:
        response = client.get(url)
        assert response.status_code == 200 and len(response.content) > 1000, url
    assert client.get("/redoc").status_code == 200


def test_openapi_documents_every_answer_and_the_errors_match_it(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    responses = spec["paths"]["/predict"]["post"]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictionResponse")
    for status in ("400", "413", "415", "422", "503"):
        assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse"), status
    assert "HTTPValidationError" not in schemas  # FastAPI's own 422 shape, which this service never sends
    for response, status in ((_post(client, b""), 400), (client.post("/predict"), 422)):
        assert response.status_code == status
        jsonschema.validate(response.json(), schemas["ErrorResponse"])
    answer = _post(client, encode(lesion_image("Cancer", np.random.default_rng(2)), "JPEG")).json()
    jsonschema.validate(answer, {**schemas["PredictionResponse"], "additionalProperties": False})


def _series(text: str, name: str, application: str) -> float:
    """The sum of one Prometheus series over every label set of `application`."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith(name + "{") and f'application="{application}"' in line
    )


def test_metrics_on_the_app_count_every_batch_and_image(client, jpeg):
    """GET /metrics: our series beside Serve's; the batch-size histogram agrees with the batches this replica
    formed (its count is batches, its sum images), whatever came before this test."""
    for _ in range(6):  # one at a time: six batches of one image
        _post(client, jpeg)
    _post(client, b"", "empty.jpg")
    formed = {int(size): count for size, count in client.get("/stats").json()["batch_sizes"].items()}
    assert formed.get(1, 0) >= 6
    batches, images = sum(formed.values()), sum(size * count for size, count in formed.items())
    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    while True:
        text = client.get("/metrics").text
        exported = (_series(text, "ray_skin_ray_batch_size_count", APP), _series(text, "ray_skin_ray_batch_size_sum", APP))
        if (exported == (batches, images) and 'reason="empty"' in text) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert exported == (batches, images)
    assert "ray_serve_num_http_requests" in text  # Serve's own metrics, beside ours
    assert "ray_skin_ray_predictions_total" in text and 'reason="empty"' in text


@pytest.mark.parametrize("layout", ["fused", "split"])
def test_overload_answers_503_and_never_500(service, untrained_bundle, jpeg, layout):
    """A replica that admits 2 images at a time, under a burst of 40: the excess gets a JSON 503, none 500,
    then it recovers."""
    settings = ServeSettings(
        bundle=str(untrained_bundle), layout=layout, max_batch_size=2, batch_wait_timeout_s=0.5, max_pending_images=2
    )
    serve.run(app_builder(settings), name="tight", route_prefix="/tight")

    async def burst():
        async with httpx.AsyncClient(base_url=service, timeout=120) as http:
            return await asyncio.gather(
                *(http.post("/tight/predict", files={"file": ("x.jpg", jpeg, "image/jpeg")}) for _ in range(40))
            )

    try:
        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert 503 in codes and 200 in codes
        assert set(codes) <= {200, 503}, codes
        assert all("overloaded" in r.json()["detail"] for r in responses if r.status_code == 503)
        assert httpx.post(f"{service}/tight/predict", files={"file": ("x.jpg", jpeg, "image/jpeg")}).status_code == 200
    finally:
        serve.delete("tight")


@pytest.mark.parametrize("layout", ["fused", "split"])
def test_reconfigure_swaps_the_model_without_downtime(service, client, untrained_bundle, tmp_path, jpeg, layout):
    """`user_config: {model: ...}` on the deployment that holds the model (Ingress when fused, SkinModel when
    split) swaps the bundle in place while requests keep succeeding."""
    import json
    import threading

    swapped = tmp_path / "swapped"
    shutil.copytree(untrained_bundle, swapped)
    metadata = json.loads((swapped / "bundle.json").read_text())
    (swapped / "bundle.json").write_text(json.dumps({**metadata, "model_version": "swapped-test"}))
    settings = ServeSettings(bundle=str(untrained_bundle), layout=layout, max_batch_size=4, batch_wait_timeout_s=0.01)

    def deploy(bundle: Path) -> None:
        if layout == "fused":
            app = Ingress.options(name="SwapIngress", user_config={"bundle": str(bundle)}).bind(settings)
        else:
            model = SkinModel.options(name="SwapModel", user_config={"bundle": str(bundle)}).bind(str(untrained_bundle), "auto")
            app = Ingress.options(name="SwapIngress").bind(settings, {"default": model})
        serve.run(app, name="swap", route_prefix="/swap")

    deploy(untrained_bundle)
    codes: list[int] = []
    swapping = threading.Event()

    def keep_asking():
        with httpx.Client(base_url=service, timeout=60) as http:
            while not swapping.is_set() or len(codes) < 5:
                codes.append(http.post("/swap/predict", files={"file": ("x.jpg", jpeg, "image/jpeg")}).status_code)

    try:
        assert client.get("/swap/model").json()["model_version"] == "untrained-test"
        asker = threading.Thread(target=keep_asking)
        asker.start()
        deploy(swapped)
        swapping.set()
        asker.join(timeout=120)
        assert client.get("/swap/model").json()["model_version"] == "swapped-test"
        assert codes and set(codes) == {200}, codes
    finally:
        serve.delete("swap")


def test_a_redeploy_under_load_loses_no_request(service, untrained_bundle, jpeg):
    """`serve deploy` of changed settings replaces every replica while 8 clients keep asking: the old replicas
    finish what they received (drain_timeout_s), the new ones take the rest; every answer is a 200."""
    before = ServeSettings(bundle=str(untrained_bundle), layout="split", max_batch_size=8)
    serve.run(app_builder(before), name="redeploy", route_prefix="/redeploy")
    redeployed = []

    async def load_while_redeploying():
        def redeploy():
            serve.run(app_builder(before.model_copy(update={"max_batch_size": 4})), name="redeploy", route_prefix="/redeploy")
            redeployed.append(time.monotonic())

        loading = asyncio.ensure_future(
            steady_load(f"{service}/redeploy", jpeg, 8, lambda: redeployed and time.monotonic() > redeployed[0] + 3, [])
        )
        await asyncio.sleep(2)
        await asyncio.to_thread(redeploy)
        return await loading

    try:
        answers = asyncio.run(load_while_redeploying())
        assert {status for _, status, _ in answers} == {200}, [status for _, status, _ in answers if status != 200]
        assert any(sent > redeployed[0] for sent, _, _ in answers)
    finally:
        serve.delete("redeploy")


def _replica_pid(app: str, deployment: str) -> int:
    from ray.util.state import list_actors

    alive = list_actors(filters=[("state", "=", "ALIVE")])
    return next(actor.pid for actor in alive if actor.class_name == f"ServeReplica:{app}:{deployment}")


@pytest.mark.parametrize("victim", ["SkinModel", "Ingress"])
def test_a_replica_killed_under_load_never_answers_500(service, untrained_bundle, jpeg, victim):
    """SIGKILL of a replica while 16 clients ask. SkinModel: the Ingress asks once more, which Serve routes to
    the replacement, so every answer is a 200 (or a JSON 503 with Retry-After). Ingress: the requests inside the
    killed process are lost with it; HAProxy closes their connections without an answer (a client may retry:
    a prediction is idempotent), never a 500; the replacement answers everything after."""
    serve.run(app_builder(ServeSettings(bundle=str(untrained_bundle), layout="split")), name="faults", route_prefix="/faults")
    url = f"{service}/faults"
    killed = []

    async def load_with_a_kill():
        def recovered():  # the replacement answered a request sent after the kill
            return any(sent > killed[0] + 1 and status == 200 for sent, status, _ in answers) if killed else False

        loading = asyncio.ensure_future(steady_load(url, jpeg, 16, lambda: recovered() or time.monotonic() > deadline, answers))
        await asyncio.sleep(3)
        os.kill(_replica_pid("faults", victim), signal.SIGKILL)
        killed.append(time.monotonic())
        return await loading

    answers: list = []
    deadline = time.monotonic() + 120
    try:
        asyncio.run(load_with_a_kill())
        statuses = [status for _, status, _ in answers]
        assert 500 not in statuses and 200 in statuses
        for _, status, response in answers:
            if status == 503:
                assert response.headers["retry-after"] and response.json()["detail"]
        lost = [status for status in statuses if isinstance(status, str)]
        assert len(lost) <= (16 if victim == "Ingress" else 0), lost
        assert set(statuses) <= {200, 503, *lost}
        assert any(sent > killed[0] + 1 and status == 200 for sent, status, _ in answers), "never recovered"
    finally:
        serve.delete("faults")


def _post_retrying_503(http: httpx.Client, data: bytes, retries: int = 3) -> httpx.Response:
    for _ in range(retries):
        response = _post(http, data)
        if response.status_code != 503:
            return response
        time.sleep(float(response.headers["retry-after"]))
    return _post(http, data)


def test_slow_uploads_are_cut_and_normal_clients_keep_their_answers(service, untrained_bundle, jpeg):
    """300 clients that send an upload's headers and then a byte a second (slowloris), against an app allowing
    a 3 s upload and 128 uploads in progress: normal clients meanwhile get every answer (retrying a 503 after its
    Retry-After, as HTTP clients do); each slow upload is
    answered 408 (too slow, or cut for a faster one), none stays open past its deadline."""
    import socket
    import threading

    serve.run(app_builder(ServeSettings(bundle=str(untrained_bundle), upload_timeout_s=3)), name="slow", route_prefix="/slow")
    host, port = service.removeprefix("http://").split(":")
    head = (
        "POST /slow/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        "Content-Length: 100000\r\n\r\n--b\r\n"
    ).encode()
    slow = []
    for _ in range(300):
        connection = socket.create_connection((host, int(port)), timeout=10)
        connection.sendall(head)
        slow.append(connection)
    answered: dict[int, bytes] = {}
    done = threading.Event()

    def trickle():  # a byte a second on every connection not yet answered
        while not done.is_set():
            for i, connection in enumerate(slow):
                if i not in answered:
                    try:
                        connection.sendall(b"x")
                    except OSError:
                        pass
            done.wait(1)

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        with httpx.Client(base_url=f"{service}/slow", timeout=60) as http:
            # A client as HTTP has them: a 503 is retried after its Retry-After, at most 3 times.
            responses = [_post_retrying_503(http, jpeg) for _ in range(20)]
        assert [response.status_code for response in responses] == [200] * 20, [r.text for r in responses if r.status_code != 200]
        deadline = time.monotonic() + 3 + 10  # the upload timeout, and time for 300 answers
        while len(answered) < len(slow) and time.monotonic() < deadline:
            for i, connection in enumerate(slow):
                if i not in answered:
                    connection.settimeout(0.01)
                    try:
                        answered[i] = connection.recv(64)
                    except TimeoutError:
                        pass
                    except OSError as exc:
                        answered[i] = repr(exc).encode()
        statuses = sorted({answer.split(b" ")[1] if answer.startswith(b"HTTP/1.1 ") else answer for answer in answered.values()})
        assert len(answered) == len(slow), f"{len(slow) - len(answered)} slow uploads still open"
        assert statuses == [b"408"], statuses
    finally:
        done.set()
        for connection in slow:
            connection.close()
        serve.delete("slow")


def _image_files(fmt: str):
    """A Hypothesis strategy of real image files in `fmt`, of any size and colour mode the service takes."""

    def draw(size, mode, seed):
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        return encode(Image.fromarray(pixels).convert(mode), fmt)

    modes = ["RGB", "L"] if fmt == "JPEG" else ["RGB", "L", "RGBA", "P"]
    return st.builds(draw, st.tuples(st.integers(1, 300), st.integers(1, 300)), st.sampled_from(modes), st.integers(0, 2**32 - 1))


@pytest.fixture
def api_schema(service):
    """The service's own OpenAPI document; schema-valid image parts are real images (the document names
    image/* for them), so a request the document allows must be answered as it says. Not the protocol's infer
    routes: whether an inference request is valid depends on its content (its shape against its data, base64 that
    is an image), which a schema cannot say; their own clients and test_inference_protocol.py hold them."""
    schemathesis.openapi.media_type("image/png", _image_files("PNG"))
    schemathesis.openapi.media_type("image/jpeg", _image_files("JPEG"))
    return schemathesis.openapi.from_url(f"{service}/openapi.json").exclude(path_regex=r"/infer$")


@pytest.mark.ray  # its schema comes from the service fixture, resolved at run time
@schemathesis.pytest.from_fixture("api_schema").parametrize()
# Derandomized: the same requests every run, so a finding reproduces from the suite itself.
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_service_answers_as_its_openapi_document_says(case):
    """Schemathesis generates requests from /openapi.json (valid and invalid ones): no server error, no status
    the document does not list, every answer of the documented shape, and every request it allows accepted."""
    case.call_and_validate(
        checks=[not_a_server_error, status_code_conformance, response_schema_conformance, positive_data_acceptance],
        timeout=60,
    )


def _replica_http_port(app: str) -> int:
    """The port of the Ingress replica's own HTTP server, which HAProxy forwards to (30000 and up)."""
    import psutil
    from ray.serve._private.constants import RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT, RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT

    listening = psutil.Process(_replica_pid(app, "Ingress")).net_connections(kind="tcp")
    ports = [c.laddr.port for c in listening if c.status == psutil.CONN_LISTEN
             and RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT <= c.laddr.port <= RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT]
    assert len(ports) == 1, sorted(c.laddr.port for c in listening if c.status == psutil.CONN_LISTEN)
    return ports[0]


def _raw_chunked_upload(host: str, port: int, path: str, megabytes: int) -> bytes:
    """POST `megabytes` of body with `Transfer-Encoding: Chunked` (capitalised) and no Content-Length over a raw
    socket; the status line of whatever answers first."""
    import socket

    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            "Transfer-Encoding: Chunked\r\n\r\n".encode()
        )
        part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        connection.sendall(b"%x\r\n%s\r\n" % (len(part), part))  # a well-formed file part, growing without end
        chunk = b"x" * 2**16
        try:
            for _ in range(megabytes * 16):
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            connection.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed while the body was still coming: what a limit does
            pass
        return connection.recv(4096).split(b"\r\n", 1)[0]


def test_a_capitalised_chunked_upload_over_the_limit_is_refused_at_every_port(service):
    """The body limit (2 MB here) holds for `Transfer-Encoding: Chunked`, through HAProxy and at the replica's
    own port, which read a 40 MB body before answering when the check was case-sensitive."""
    host, port = service.removeprefix("http://").split(":")
    for target in (int(port), _replica_http_port(APP)):
        assert _raw_chunked_upload(host, target, "/predict", megabytes=8) == b"HTTP/1.1 413 Request Entity Too Large", target


def test_api_keys_over_http(service, untrained_bundle, tmp_path, jpeg):
    """An app with keys: 401 without or with a wrong key (WWW-Authenticate), 200 with a key in either header,
    429 with Retry-After past the key's rate limit; the page and /healthz stay open, /openapi.json says how."""
    keys = tmp_path / "api-keys"
    keys.write_text("clinic-a:s3cret-for-the-clinic-0001\n")
    settings = ServeSettings(bundle=str(untrained_bundle), api_keys=str(keys), rate_limit_per_key=3)
    serve.run(app_builder(settings), name="keyed", route_prefix="/keyed")
    try:
        with httpx.Client(base_url=f"{service}/keyed", timeout=60) as http:
            assert http.get("/healthz").status_code == 200 and http.get("/").status_code == 200
            refused = http.post("/predict", files={"file": ("x.jpg", jpeg, "image/jpeg")})
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            wrong = http.get("/model", headers={"Authorization": "Bearer not-the-secret-at-all"})
            assert wrong.status_code == 401
            bearer = {"Authorization": "Bearer s3cret-for-the-clinic-0001"}
            answered = http.post("/predict", files={"file": ("x.jpg", jpeg, "image/jpeg")}, headers=bearer)
            assert answered.status_code == 200, answered.text
            assert http.get("/model", headers={"X-API-Key": "s3cret-for-the-clinic-0001"}).status_code == 200
            statuses = [http.get("/stats", headers=bearer).status_code for _ in range(6)]
            assert statuses[-1] == 429 and set(statuses) == {200, 429}
            limited = http.get("/stats", headers=bearer)
            assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
            spec = http.get("/openapi.json").json()
            assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
            assert "401" in spec["paths"]["/predict"]["post"]["responses"] and "security" not in spec["paths"]["/healthz"]["get"]
    finally:
        serve.delete("keyed")


def test_explanations_have_their_own_bound_and_never_answer_500(service, client, jpeg):
    """24 concurrent /explain requests against a replica that makes 2 at a time: the rest get a JSON 503 with
    Retry-After before their bodies are read, /predict keeps answering meanwhile, nothing answers 500."""

    async def burst():
        async with httpx.AsyncClient(base_url=service, timeout=120) as http:
            explanations = [http.post("/explain", files={"file": ("x.jpg", jpeg, "image/jpeg")}) for _ in range(24)]
            predictions = [http.post("/predict", files={"file": ("x.jpg", jpeg, "image/jpeg")}) for _ in range(4)]
            return await asyncio.gather(asyncio.gather(*explanations), asyncio.gather(*predictions))

    explained, predicted = asyncio.run(burst())
    statuses = [response.status_code for response in explained]
    assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
    for response in explained:
        if response.status_code == 503:
            assert "explanations are already being made" in response.json()["detail"] and response.headers["retry-after"]
    assert [response.status_code for response in predicted] == [200] * 4


def test_a_refused_user_config_keeps_the_running_configuration(service, untrained_bundle, jpeg):
    """`user_config` goes through the settings' validation: `max_batch_size: 0` (which stopped the batch loop, so
    requests waited for ever) is refused in the replica's log and the replica keeps batching as it did."""
    settings = ServeSettings(bundle=str(untrained_bundle))
    app = Ingress.options(name="Refused", user_config={"max_batch_size": 0}).bind(settings)
    serve.run(app, name="refused", route_prefix="/refused")
    try:
        response = httpx.post(f"{service}/refused/predict", files={"file": ("x.jpg", jpeg, "image/jpeg")}, timeout=60)
        assert response.status_code == 200, response.text
    finally:
        serve.delete("refused")


@pytest.fixture(scope="module")
def canary_bundle(untrained_bundle, tmp_path_factory) -> Path:
    """The untrained bundle under another model_version: the version a record names is then visible."""
    import json

    path = tmp_path_factory.mktemp("canary") / "bundle"
    shutil.copytree(untrained_bundle, path)
    metadata = json.loads((path / "bundle.json").read_text())
    (path / "bundle.json").write_text(json.dumps({**metadata, "model_version": "canary-test"}))
    return path


VERSIONS_ARGS = {"traffic": "stable=80,canary=20", "shadow": "candidate", "max_batch_size": 8, "batch_wait_timeout_s": 0.01}


def _versions(untrained_bundle, canary_bundle, small_input_bundle) -> list[str]:
    """stable and canary, and a shadow at another input size."""
    return [f"stable={untrained_bundle}", f"canary={canary_bundle}", f"candidate={small_input_bundle}"]


def test_versions_split_traffic_by_weight_pin_and_shadow(
    service, client, untrained_bundle, canary_bundle, small_input_bundle, jpeg
):
    """500 requests at 16 at once: canary answers within binomial noise of 20%, every answer names its version in
    the header and its bundle's model_version in the record; X-Model-Version pins; an unknown version is 404; the
    shadow classifies every /predict after its answer and never answers one."""
    settings = ServeSettings(bundle=_versions(untrained_bundle, canary_bundle, small_input_bundle), **VERSIONS_ARGS)
    serve.run(app_builder(settings), name="versions", route_prefix="/versions")
    model_versions = {"stable": "untrained-test", "canary": "canary-test"}

    async def requests(count: int, headers: dict) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"{service}/versions", timeout=120) as http:
            slots = asyncio.Semaphore(16)

            async def one():
                async with slots:
                    return await http.post("/predict", files={"file": ("x.jpg", jpeg, "image/jpeg")}, headers=headers)

            return await asyncio.gather(*(one() for _ in range(count)))

    try:
        answers = asyncio.run(requests(500, {}))
        assert {response.status_code for response in answers} == {200}
        answered_by = [response.headers["x-model-version"] for response in answers]
        assert [response.json()["model_version"] for response in answers] == [model_versions[n] for n in answered_by]
        assert abs(answered_by.count("canary") - 100) < 4 * math.sqrt(500 * 0.2 * 0.8), answered_by.count("canary")
        assert set(answered_by) == {"stable", "canary"}  # never the shadow
        pinned = asyncio.run(requests(20, {"X-Model-Version": "canary"}))
        assert {(r.status_code, r.headers["x-model-version"], r.json()["model_version"]) for r in pinned} == {
            (200, "canary", "canary-test")
        }
        unknown = client.post(
            "/versions/predict", files={"file": ("x.jpg", jpeg, "image/jpeg")}, headers={"X-Model-Version": "v9"}
        )
        assert unknown.status_code == 404 and "canary" in unknown.json()["detail"]
        shares = client.get("/versions/model").json()["versions"]
        assert {name: (share["traffic_percent"], share["shadow_percent"]) for name, share in shares.items()} == {
            "stable": (80, 0), "canary": (20, 0), "candidate": (0, 100)
        }
        deadline = time.monotonic() + 30  # the shadow's copies are classified after their answers
        while (shadowed := _images_batched(client, "/versions", "candidate")) < 520 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert shadowed == 520  # every /predict answered, once
        expected = {  # per-version series, as Ray exports them (every few seconds)
            ("ray_skin_ray_predictions_total", 'version="canary"'), ("ray_skin_ray_request_latency_ms_count", 'version="stable"'),
            ("ray_skin_ray_shadow_comparisons_total", 'version="candidate"'),
            ("ray_skin_ray_shadow_probability_difference_count", 'version="candidate"'),
        }
        deadline = time.monotonic() + 60
        while (missing := {(name, label) for name, label in expected if not _exported(client, "versions", name, label)}) and (
            time.monotonic() < deadline
        ):
            time.sleep(2)
        assert not missing
    finally:
        serve.delete("versions")


def _exported(client, application: str, name: str, label: str) -> bool:
    return any(line.startswith(name + "{") and label in line and f'application="{application}"' in line
               for line in client.get("/metrics").text.splitlines())


def _images_batched(client, prefix: str, version: str) -> int:
    by_size = client.get(f"{prefix}/stats").json()["batch_sizes_by_version"][version]
    return sum(int(size) * count for size, count in by_size.items())


def test_a_traffic_change_by_serve_deploy_drops_nothing_under_load(
    ray_context, service, untrained_bundle, canary_bundle, small_input_bundle, jpeg, tmp_path
):
    """`serve deploy` of the YAML with `user_config: {traffic: ...}` on Ingress moves every new request to canary
    while 8 clients keep asking: each answer a 200, the replica kept (its models stay loaded), and after the change
    only canary answers."""
    import yaml

    def deploy(user_config: dict) -> None:
        application = {
            "name": "declared", "route_prefix": "/declared", "import_path": "skin_ray.serve:app_builder",
            "args": {"bundle": _versions(untrained_bundle, canary_bundle, small_input_bundle), **VERSIONS_ARGS},
            "deployments": [{"name": "Ingress", "user_config": user_config}],
        }
        config = tmp_path / "serve_config.yaml"
        config.write_text(yaml.safe_dump({"applications": [application]}))
        address = f"http://{ray_context.dashboard_url}"
        subprocess.run(["serve", "deploy", str(config), "--address", address], check=True, capture_output=True, timeout=120)

    def canary_share() -> float:
        return httpx.get(f"{service}/declared/model", timeout=60).json()["versions"]["canary"]["traffic_percent"]

    deploy({})
    wait_healthy(f"{service}/declared")
    moved = []

    async def load_while_moving():
        def move():
            deploy({"traffic": {"canary": 100}})
            while canary_share() != 100:  # Serve reconfigures the replica shortly after
                time.sleep(0.1)
            moved.append(time.monotonic())

        loading = asyncio.ensure_future(
            steady_load(f"{service}/declared", jpeg, 8, lambda: moved and time.monotonic() > moved[0] + 3, [])
        )
        await asyncio.sleep(2)
        pid = _replica_pid("declared", "Ingress")
        await asyncio.to_thread(move)
        return await loading, pid

    try:
        answers, pid = asyncio.run(load_while_moving())
        assert {status for _, status, _ in answers} == {200}, [status for _, status, _ in answers if status != 200]
        assert _replica_pid("declared", "Ingress") == pid
        after = [response.headers["x-model-version"] for sent, _, response in answers if sent > moved[0]]
        assert after and set(after) == {"canary"}
        assert "stable" in {response.headers["x-model-version"] for _, _, response in answers}
    finally:
        serve.delete("declared")


def _audit_lines(folder: Path) -> list[dict]:
    import json

    return [json.loads(line) for path in sorted(folder.glob("audit-*.jsonl")) for line in path.read_text().splitlines()]


def test_every_image_answered_or_refused_is_on_the_audit_trail(service, untrained_bundle, canary_bundle, jpeg, tmp_path):
    """Mixed routes, some refused: one audit line per image with its sha256, version, caller's request id and
    status; a replica killed after `audit_flush_s` lost none of them; a graceful stop writes the rest."""
    import hashlib

    folder = tmp_path / "audit"
    settings = ServeSettings(
        bundle=[f"stable={untrained_bundle}", f"canary={canary_bundle}"], traffic="stable=50,canary=50",
        audit=str(folder), audit_flush_s=0.5, max_upload_mb=2,
    )
    serve.run(app_builder(settings), name="audited", route_prefix="/audited")
    png = _odd_images()["grayscale"][0]
    sent = [  # (route, files, headers, status of each image, its bytes or None)
        ("/predict", {"file": ("a.jpg", jpeg, "image/jpeg")}, {"X-Request-ID": "req-1"}, [(200, jpeg)]),
        ("/predict", {"file": ("b.png", png, "image/png")}, {"X-Model-Version": "canary"}, [(200, png)]),
        ("/predict", {"file": ("c.jpg", b"nope", "image/jpeg")}, {}, [(400, b"nope")]),
        ("/predict", {"file": ("d.txt", b"text", "text/plain")}, {}, [(415, None)]),
        ("/predict", {"file": ("e.jpg", jpeg, "image/jpeg")}, {"X-Model-Version": "v9"}, [(404, None)]),
        ("/explain", {"file": ("f.jpg", jpeg, "image/jpeg")}, {}, [(200, jpeg)]),
        ("/predict", {"file": ("g.jpg", b"\xff" * (3 * 2**20), "image/jpeg")}, {}, [(413, None)]),
    ]
    batch = [("files", ("h.jpg", jpeg, "image/jpeg")), ("files", ("i.jpg", b"bad", "image/jpeg"))]
    answers = [
        httpx.post(f"{service}/audited{route}", files=files, headers=headers, timeout=60) for route, files, headers, _ in sent
    ]
    answers.append(httpx.post(f"{service}/audited/predict/batch", files=batch, timeout=60))
    expected = [image for *_, images in sent for image in images] + [(200, jpeg), (400, b"bad")]
    try:
        assert [a.status_code for a in answers] == [images[0][0] for *_, images in sent] + [200]
        assert answers[0].headers["x-request-id"] == "req-1" and all(a.headers["x-request-id"] for a in answers)
        time.sleep(1.5)  # past audit_flush_s
        os.kill(_replica_pid("audited", "Ingress"), signal.SIGKILL)  # a crash: what was flushed stays
        lines = _audit_lines(folder)
        audited = [(line["status"], line["input_sha256"]) for line in lines]
        written = [(status, data and hashlib.sha256(data).hexdigest()) for status, data in expected]
        assert audited[:-2] == written[:-2] and sorted(audited[-2:]) == sorted(written[-2:])  # a batch's files at once
        assert lines[0]["request_id"] == "req-1" and lines[1]["version"] == "canary"
        assert lines[1]["model_version"] == "canary-test" and lines[1]["label"] in ("Cancer", "Non_Cancer")
        assert lines[2]["reason"].startswith("not_an_image") and lines[4]["reason"].startswith("no model version")
        assert {line["route"] for line in lines} == {"/predict", "/explain", "/predict/batch"}
        assert all(line["latency_ms"] >= 0 and line["time"].endswith("Z") for line in lines)
        wait_healthy(f"{service}/audited")  # the replacement replica
        for _ in range(3):
            answer = httpx.post(f"{service}/audited/predict", files={"file": ("x.jpg", jpeg, "image/jpeg")}, timeout=60)
            assert answer.status_code == 200
    finally:
        serve.delete("audited")  # a graceful stop: the replica writes what is queued
    assert len(_audit_lines(folder)) == len(expected) + 3


def test_a_failing_audit_sink_is_counted_or_answered_503_when_required(
    service, client, untrained_bundle, jpeg, s3_endpoint, bucket
):
    """Audit to an S3 prefix (moto): lines arrive as objects; once the bucket is gone the service keeps answering
    and counts the lines it lost, and with audit_required it answers 503 instead."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for required in (False, True):
        name = f"sink{int(required)}"
        settings = ServeSettings(bundle=str(untrained_bundle), audit=f"s3://{bucket}/{name}", audit_flush_s=0.2,
                                 audit_required=required)
        serve.run(app_builder(settings), name=name, route_prefix=f"/{name}")
        url = f"{service}/{name}/predict"
        try:
            assert httpx.post(url, files={"file": ("x.jpg", jpeg, "image/jpeg")}, timeout=60).status_code == 200
            deadline = time.monotonic() + 10
            while not s3.list_objects_v2(Bucket=bucket, Prefix=name).get("Contents") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert s3.list_objects_v2(Bucket=bucket, Prefix=name).get("Contents")
            stored = s3.list_objects_v2(Bucket=bucket)["Contents"]
            s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": stored_object["Key"]} for stored_object in stored]})
            s3.delete_bucket(Bucket=bucket)
            answered = [httpx.post(url, files={"file": ("x.jpg", jpeg, "image/jpeg")}, timeout=60) for _ in range(2)]
            time.sleep(1)  # a flush fails
            after = httpx.post(url, files={"file": ("x.jpg", jpeg, "image/jpeg")}, timeout=60)
            assert [a.status_code for a in answered] == [200, 200]
            if required:
                assert after.status_code == 503 and "audit" in after.json()["detail"]
            else:
                assert after.status_code == 200
                deadline = time.monotonic() + 60
                while not _exported(client, name, "ray_skin_ray_audit_dropped_total", "") and time.monotonic() < deadline:
                    time.sleep(2)
                assert _exported(client, name, "ray_skin_ray_audit_dropped_total", "")
        finally:
            serve.delete(name)
            s3.create_bucket(Bucket=bucket)


def _drift_gauges(client, application: str, version: str) -> dict[str, dict[str, float]]:
    """The drift gauges of one version, as Ray exports them: {series: {statistic: value}}."""
    gauges: dict[str, dict[str, float]] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("ray_skin_ray_drift_") and f'application="{application}"' in line and f'version="{version}"' in line:
            name = line.split("{", 1)[0]
            statistic = re.search(r'statistic="([^"]+)"', line)
            gauges.setdefault(name, {})[statistic.group(1) if statistic else ""] = float(line.rsplit(" ", 1)[1])
    return gauges


def _drifted(gauges: dict) -> set[str]:
    thresholds = gauges.get("ray_skin_ray_drift_threshold", {})
    return {name for name, distance in gauges.get("ray_skin_ray_drift_distance", {}).items() if distance > thresholds[name]}


def _drift_sources(guarded_bundle) -> dict[str, tuple[str, list]]:
    """Each version served for the drift test: its bundle and the files its unchanged stream is made of. The
    shipped model's stream, its own validation images, joins when the real data is here."""
    from skin_ray.bundle import DEFAULT_BUNDLE, load_bundle
    from skin_ray.finalize import bundle_split
    from skin_ray.testing import guarded_bundle_lesions, needs_training_data, shipped_trees

    _, lesions = guarded_bundle_lesions(seed=11, count=DRIFT_WINDOW)
    sources = {"generated": (str(guarded_bundle), [encode(image) for image in lesions])}
    if not needs_training_data.args[0]:
        shipped = load_bundle(DEFAULT_BUNDLE, safeguards=False)
        split = bundle_split(shipped, shipped_trees(shipped.metadata))
        chosen = np.random.default_rng(0).choice(len(split.validation.paths), DRIFT_WINDOW, replace=False)
        sources["isic"] = (DEFAULT_BUNDLE, [Path(split.validation.paths[i]).read_bytes() for i in sorted(chosen)])
    return sources


DRIFT_WINDOW = 60
ALL = {"ood_score", "cancer_probability", "brightness", "red_share", "blue_share", "sharpness", "megapixels",
       "refused", "uncertain", "cancer"}
# Per stream: the statistics of which at least one must cross its threshold, and those none of which may (the
# blurred stream shows the window forgot the colour cast before it).
DRIFT_EXPECTED = {
    "unchanged": (set(), ALL),
    "colour_cast": ({"red_share", "blue_share"}, {"megapixels"}),
    "blurred": ({"sharpness"}, {"red_share", "blue_share", "megapixels"}),
    "everyday_photos_mixed_in": ({"ood_score", "refused"}, set()),
}


def _as_expected(drifted: set[str], stream: str) -> bool:
    some, none = DRIFT_EXPECTED[stream]
    return (not some or bool(drifted & some)) and not drifted & none


def test_drift_gauges_and_the_offline_report_separate_shifted_streams_from_unchanged_ones(
    service, client, guarded_bundle, tmp_path
):
    """Streams of a window's size, one after another: new images like the bundle's validation split, then the
    same with a colour cast, blurred, and with everyday photos mixed in. Live, each shifted stream's expected
    statistic crosses its threshold in the exported gauges and the unchanged stream crosses none; offline,
    `skin-ray drift` over the same audit lines (each stream dated a day apart) says the same per day. With the
    real data, the shipped model's validation images go through as a second version."""
    import json

    from skin_ray.config import DriftSettings
    from skin_ray.drift_report import drift_report
    from skin_ray.testing import drift_streams

    sources = _drift_sources(guarded_bundle)
    audit = tmp_path / "audit"
    settings = ServeSettings(bundle=[f"{name}={bundle}" for name, (bundle, _) in sources.items()],
                             drift_window=DRIFT_WINDOW, audit=str(audit), audit_flush_s=0.2)
    serve.run(app_builder(settings), name="drift", route_prefix="/drift")
    day_of: dict[str, str] = {}  # a request's id -> the day its stream is dated in the audit copy

    def post(name: str, request_id: str, data: bytes) -> int:
        headers = {"X-Model-Version": name, "X-Request-ID": request_id}
        return client.post("/drift/predict", files={"file": ("x.jpg", data, "image/jpeg")}, headers=headers).status_code

    try:
        for name, (_, unchanged) in sources.items():
            for day, (stream, files) in enumerate(drift_streams(unchanged, np.random.default_rng(4)).items(), start=1):
                ids = [f"{name}-{stream}-{index}" for index in range(len(files))]
                with ThreadPoolExecutor(8) as clients:  # a stream's images at once, batched: a window has no order
                    assert set(clients.map(post, [name] * len(files), ids, files)) == {200}
                day_of.update(dict.fromkeys(ids, f"2026-01-{day:02d}"))
                deadline = time.monotonic() + 60
                while True:  # Ray exports gauges every few seconds: wait for this stream's window
                    gauges = _drift_gauges(client, "drift", name)
                    drifted = _drifted(gauges)
                    full = gauges.get("ray_skin_ray_drift_window_size", {}).get("") == DRIFT_WINDOW
                    if (full and _as_expected(drifted, stream)) or time.monotonic() > deadline:
                        break
                    time.sleep(1)
                assert full and _as_expected(drifted, stream), (name, stream, gauges)
                assert set(gauges["ray_skin_ray_drift_rate"]) == {"refused", "uncertain", "cancer"}
    finally:
        serve.delete("drift")  # writes the audit lines still queued
    dated = tmp_path / "dated"
    dated.mkdir()
    lines = [json.loads(line) for path in sorted(audit.glob("audit-*.jsonl")) for line in path.read_text().splitlines()]
    assert len(lines) == 4 * DRIFT_WINDOW * len(sources)
    (dated / "audit-dated.jsonl").write_text("".join(
        json.dumps({**line, "time": day_of[line["request_id"]] + line["time"][10:]}) + "\n" for line in lines
    ) + "not json\n")
    for name, (bundle, _) in sources.items():
        summary = drift_report(DriftSettings(source=str(dated), bundle=bundle, by="day", report=str(tmp_path / name)))
        assert summary["skipped_lines"] == 1 and (tmp_path / name / "drift.png").stat().st_size > 0
        for day, stream in enumerate(DRIFT_EXPECTED, start=1):
            period = summary["periods"][f"2026-01-{day:02d}"]
            drifted = {statistic for statistic, row in period["statistics"].items() if row["drifted"]}
            assert period["images"] == DRIFT_WINDOW and _as_expected(drifted, stream), (name, stream, period)
    # Classify results (the same answers as rows of a classify job's Parquet schema): no time, no image statistics.
    import pyarrow
    import pyarrow.parquet

    from skin_ray.classify import result_schema

    generated = [line for line in lines if line["request_id"].startswith("generated-everyday")]
    rows = [{column: line.get(column) for column in result_schema(["Cancer", "Non_Cancer"]).names} for line in generated]
    (tmp_path / "rows").mkdir()
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows, schema=result_schema(["Cancer", "Non_Cancer"])),
                                tmp_path / "rows" / "part.parquet")
    summary = drift_report(DriftSettings(source=str(tmp_path / "rows"), bundle=sources["generated"][0]))
    (period,) = summary["periods"].values()
    assert summary["kind"] == "classify results" and period["images"] == DRIFT_WINDOW
    assert "brightness" not in period["statistics"] and _as_expected(
        {name for name, row in period["statistics"].items() if row["drifted"]}, "everyday_photos_mixed_in"
    )


def _validated(model, document: dict) -> dict:
    """`document` checked against the protocol response `model` written from the specification's text."""
    model.model_validate(document)
    return document


def test_the_open_inference_protocol_with_tritons_and_kserves_own_clients(
    service, client, untrained_bundle, canary_bundle
):
    """tritonclient.http and the kserve package's REST client (protocol v2) against the service: health, server and
    model metadata, inference with binary data and with JSON, one and eight images, a pinned version; the
    probabilities equal /predict's for the same files; every answer validates against the response models; the
    errors are the protocol's `{"error"}` with the spec's statuses."""
    import base64

    import tritonclient.http as triton
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    from skin_ray.preprocess import decode_pixels
    from skin_ray.serve.schemas import (
        InferenceResponse,
        LiveResponse,
        ModelMetadataResponse,
        ModelReadyResponse,
        ProtocolErrorResponse,
        ReadyResponse,
        ServerMetadataResponse,
    )

    settings = ServeSettings(bundle=[f"stable={untrained_bundle}", f"canary={canary_bundle}"], max_batch_size=8)
    serve.run(app_builder(settings), name="protocol", route_prefix="/protocol")
    rng = np.random.default_rng(9)
    files = [encode(lesion_image(("Cancer", "Non_Cancer")[i % 2], rng, size=int(rng.integers(80, 300)))) for i in range(8)]
    expected = np.array([
        [client.post("/protocol/predict", files={"file": ("x.jpg", data, "image/jpeg")},
                     headers={"X-Model-Version": "stable"}).json()["probabilities"][name] for name in ("Cancer", "Non_Cancer")]
        for data in files
    ])
    base = service.removeprefix("http://") + "/protocol"
    try:
        http = triton.InferenceServerClient(url=base)
        assert http.is_server_live() and http.is_server_ready() and http.is_model_ready("skin-ray")
        assert "binary_tensor_data" in _validated(ServerMetadataResponse, http.get_server_metadata())["extensions"]
        metadata = _validated(ModelMetadataResponse, http.get_model_metadata("skin-ray"))
        assert metadata["versions"] == ["stable", "canary"]
        assert metadata["parameters"]["class_names"] == "Cancer,Non_Cancer"

        def triton_infer(images: list[bytes], binary: bool, version: str = "") -> dict:
            tensor = triton.InferInput("image", [len(images), 1], "BYTES")
            values = images if binary else [base64.b64encode(data).decode() for data in images]
            tensor.set_data_from_numpy(np.array(values, dtype=object).reshape(-1, 1), binary_data=binary)
            outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "label")]
            result = http.infer("skin-ray", [tensor], model_version=version, outputs=outputs, request_id="r1")
            _validated(InferenceResponse, result.get_response())
            return {"probabilities": result.as_numpy("probabilities"), "label": result.as_numpy("label"),
                    "response": result.get_response()}

        for images, binary in ((files[:1], True), (files, True), (files[:1], False), (files, False)):
            answer = triton_infer(images, binary, version="stable")
            np.testing.assert_allclose(answer["probabilities"], expected[: len(images)], atol=OTHER_BATCH_ATOL)
            assert answer["response"]["id"] == "r1" and answer["response"]["model_version"] == "untrained-test"
            labels = {label.decode() if isinstance(label, bytes) else label for label in answer["label"].reshape(-1)}
            assert labels <= {"Cancer", "Non_Cancer"}
        assert triton_infer(files[:2], True, version="canary")["response"]["model_version"] == "canary-test"
        assert triton_infer(files[:2], True)["response"]["model_version"] == "untrained-test"  # the traffic rule: stable

        async def kserve_infer() -> tuple:
            rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
            url = f"{service}/protocol"
            tensor = InferInput("image", [len(files)], "BYTES")
            tensor.set_data_from_numpy(np.array(files, dtype=object), binary_data=True)
            answer = await rest.infer(url, InferRequest(model_name="skin-ray", infer_inputs=[tensor], request_id="k1"),
                                      model_name="skin-ray")
            checks = (await rest.is_server_live(url), await rest.is_server_ready(url),
                      await rest.is_model_ready(url, "skin-ray"))
            return answer, checks

        answer, checks = asyncio.run(kserve_infer())
        assert checks == (True, True, True) and answer.id == "k1"
        by_name = {output.name: output for output in answer.outputs}
        np.testing.assert_allclose(by_name["probabilities"].as_numpy(), expected, atol=OTHER_BATCH_ATOL)
        for path, model in (("/v2/health/live", LiveResponse), ("/v2/health/ready", ReadyResponse),
                            ("/v2/models/skin-ray/versions/canary/ready", ModelReadyResponse)):
            _validated(model, client.get(f"/protocol{path}").json())

        pixels = np.stack([decode_pixels(data, 170) for data in files[:2]])  # as a caller decoding itself would
        by_pixels = client.post("/protocol/v2/models/skin-ray/versions/stable/infer", json={
            "inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8", "data": pixels.reshape(-1).tolist()}],
            "outputs": [{"name": "probabilities"}]})
        assert by_pixels.status_code == 200
        probabilities = _validated(InferenceResponse, by_pixels.json())["outputs"][0]["data"]
        np.testing.assert_allclose(np.reshape(probabilities, (2, 2)), expected[:2], atol=OTHER_BATCH_ATOL)

        bad_image = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                 "data": [base64.b64encode(files[0]).decode(), base64.b64encode(b"not an image").decode()]}]}
        for path, body, status, reason in (
            ("/v2/models/other/infer", bad_image, 404, "no model 'other'"),
            ("/v2/models/skin-ray/versions/v9/infer", bad_image, 404, "no model version 'v9'"),
            ("/v2/models/skin-ray/infer", {"inputs": "x"}, 400, "not an inference request"),
            ("/v2/models/skin-ray/infer", bad_image, 400, "image 1: not_an_image"),
        ):
            refused = client.post(f"/protocol{path}", json=body)
            assert refused.status_code == status and reason in _validated(ProtocolErrorResponse, refused.json())["error"]
    finally:
        serve.delete("protocol")
