"""``fewshot serve`` against a real uvicorn server on loopback: the API, every bad input, concurrency,
the writer lock, and a SIGKILL while clients register."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import socket
import string
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
from PIL import Image

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")

from fewshot import FewShotClassifier, Registry  # noqa: E402
from serve_server import ROOT, free_port, start_server  # noqa: E402

KEY = "k" * 8 + "-serve-test-key-0123456789"


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def files(*named: tuple[str, bytes]) -> list:
    return [("images", (name, data, "application/octet-stream")) for name, data in named]


def bomb_png() -> bytes:
    """A valid PNG whose header claims 100,000 x 100,000 pixels (10 gigapixels)."""
    raw = io.BytesIO()
    Image.new("L", (1, 1)).save(raw, format="PNG")
    data = bytearray(raw.getvalue())
    data[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR's CRC over type + fields
    return bytes(data)


@pytest.fixture(scope="module")
def images(photos, views_of) -> dict[str, list[bytes]]:
    return {"cat": [jpeg(v) for v in views_of(photos["chelsea"], 4, seed=1)],
            "coffee": [jpeg(v) for v in views_of(photos["coffee"], 4, seed=2)],
            "rocket": [jpeg(v) for v in views_of(photos["rocket"], 3, seed=3)]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "key").write_text(KEY + "\n")
    srv = start_server(root / "reg", "--api-key-file", str(root / "key"), "--max-upload-mb", "2",
                       "--cors-origin", "https://till.example")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def registered(client, images):
    for label in ("cat", "coffee"):
        r = client.post(f"/v1/classes/{label}/images",
                        files=files(*[(f"{label}{i}.jpg", b) for i, b in enumerate(images[label][:3])]))
        assert r.status_code == 200, r.text
    return client


def test_register_reports_what_was_added_and_it_is_on_disk(registered, server, images):
    r = registered.post("/v1/classes/cat/images", files=files(("more.jpg", images["cat"][3])))
    assert r.json() == {"label": "cat", "added": 1, "total": 4, "errors": [], "warnings": []}
    assert Registry.load(server.registry).counts == {"cat": 4, "coffee": 3}  # a 200 means saved
    assert registered.get("/v1/classes").json() == [{"label": "cat", "count": 4}, {"label": "coffee", "count": 3}]


def test_predict_returns_the_clis_prediction_objects_in_order(registered, server, images, encoder):
    query = [("q-coffee.jpg", images["coffee"][3]), ("q-cat.jpg", images["cat"][3])]
    r = registered.post("/v1/predict", params={"top_k": 2}, files=files(*query))
    assert r.status_code == 200, r.text
    got = r.json()
    assert [p["input"] for p in got] == ["q-coffee.jpg", "q-cat.jpg"]
    assert [p["label"] for p in got] == ["coffee", "cat"]
    # The same JSON as the library (and so the CLI's --json) gives for the same images.
    from fewshot.embedding.images import NamedBytes

    library = FewShotClassifier.load(server.registry, encoder=encoder, cache=False)
    expected = [p.to_dict() for p in library.predict([NamedBytes(b, n) for n, b in query], top_k=2)]
    assert [p.keys() for p in got] == [p.keys() for p in expected]
    for g, e in zip(got, expected):  # the service runs onnxruntime, the library here eager torch
        assert g["label"] == e["label"] and g["input"] == e["input"] and g["unknown"] == e["unknown"]
        assert g["score"] == pytest.approx(e["score"], abs=1e-4)
        assert g["similarity"] == pytest.approx(e["similarity"], abs=1e-4)
        assert [t["label"] for t in g["top_k"]] == [t["label"] for t in e["top_k"]]
    assert registered.get("/v1/info").json()["runtime"] == "onnxruntime"
    assert "unavailable" not in server.log.read_text()  # no fallback to torch was warned


def test_each_bad_file_fails_alone(registered, images):
    r = registered.post("/v1/predict", files=files(
        ("empty.jpg", b""), ("notes.jpg", b"shopping list: milk, eggs\n"), ("bomb.png", bomb_png()),
        ("ok.jpg", images["cat"][0])))
    assert r.status_code == 200
    empty, text, bomb, ok = r.json()
    for bad, name in ((empty, "empty.jpg"), (text, "notes.jpg"), (bomb, "bomb.png")):
        assert bad["label"] is None and bad["error"].startswith(name)
    assert "not a recognised image" in text["error"]
    assert "decompression-bomb" in bomb["error"]
    assert ok["label"] == "cat" and ok["error"] is None


def test_registering_only_bad_files_is_refused_and_changes_nothing(registered, server):
    before = Registry.load(server.registry).counts
    r = registered.post("/v1/classes/junk/images", files=files(("a.jpg", b"not an image"), ("b.png", bomb_png())))
    assert r.status_code == 400
    assert "none of the 2 images" in r.json()["error"]
    assert Registry.load(server.registry).counts == before


@pytest.mark.parametrize("request_kwargs, status, words", [
    ({}, 400, "no images"),  # no body at all
    ({"files": {"photos": ("x.jpg", b"abc")}}, 400, "field 'images'"),  # wrong field
    ({"data": {"images": "not a file"}}, 400, "no images"),
])
def test_requests_without_images_get_a_clear_400(registered, request_kwargs, status, words):
    for path in ("/v1/predict", "/v1/classes/cat/images"):
        r = registered.post(path, **request_kwargs)
        assert r.status_code == status and words in r.json()["error"], r.text


def test_oversized_upload_is_refused_while_streaming(registered, server):
    before = Registry.load(server.registry).counts
    sent = 0

    def body():  # a streamed body without Content-Length: the server must count, not trust a header
        nonlocal sent
        for _ in range(512):  # 32 MB: more than socket buffers could swallow before the server says no
            sent += 2**16
            yield b"--b\r\nContent-Disposition: form-data; name=\"images\"; filename=\"big.jpg\"\r\n\r\n" \
                if sent == 2**16 else os.urandom(2**16)

    try:
        r = registered.post("/v1/classes/big/images", content=body(),
                            headers={"content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413 and "at most 2 MB" in r.json()["error"]
    except httpx.TransportError:
        pass  # the server may close the connection before the client has finished sending
    assert sent < 32 * 2**20  # refused before the whole body was sent
    big = files(("big.jpg", os.urandom(3 * 2**20)))  # with a Content-Length: refused up front
    r = registered.post("/v1/predict", files=big)
    assert r.status_code == 413 and "at most 2 MB" in r.json()["error"]
    assert Registry.load(server.registry).counts == before
    assert registered.get("/healthz").status_code == 200


def test_api_key_is_required_and_checked(server):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for method, path in (("GET", "/v1/classes"), ("GET", "/v1/info"), ("GET", "/metrics"),
                             ("POST", "/v1/predict"), ("DELETE", "/v1/classes/cat")):
            r = anonymous.request(method, path)
            assert r.status_code == 401 and "API key" in r.json()["error"], (method, path)
            r = anonymous.request(method, path, headers={"X-API-Key": "wrong-key-of-enough-length"})
            assert r.status_code == 403 and r.json() == {"error": "wrong API key"}
        assert anonymous.get("/v1/classes", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert anonymous.get("/healthz").json() == {"status": "ok"}  # liveness and the page are public
        assert anonymous.get("/").headers["content-type"].startswith("text/html")


@pytest.mark.parametrize("label", ["nul\x00byte", "x" * 1025])
def test_hostile_labels_are_refused(registered, images, label):
    r = registered.post(f"/v1/classes/{quote(label, safe='')}/images", files=files(("a.jpg", images["cat"][0])))
    assert r.status_code == 400 and "invalid class label" in r.json()["error"]


def test_path_like_labels_are_only_labels(registered, server, images, tmp_path_factory):
    label = "../../../escape/..%2F"
    outside = sorted(os.listdir(server.registry.parent))
    r = registered.post(f"/v1/classes/{quote(label, safe='')}/images",
                        files=files(("a.jpg", images["rocket"][0])))
    assert r.status_code == 200 and r.json()["label"] == label
    assert sorted(os.listdir(server.registry.parent)) == outside  # nothing written beside the registry
    assert label in Registry.load(server.registry).classes
    assert registered.delete(f"/v1/classes/{quote(label, safe='')}").status_code == 200


def test_rename_and_remove(registered, images):
    assert registered.post("/v1/classes/rocket/images", files=files(("r.jpg", images["rocket"][1]))).status_code == 200
    r = registered.post("/v1/classes/rocket/rename", json={"to": "space rocket"})
    assert r.status_code == 200
    assert registered.post("/v1/classes/cat/rename", json={"to": "coffee"}).status_code == 409
    assert registered.post("/v1/classes/cat/rename", content=b"coffee").status_code == 400
    assert registered.post("/v1/classes/nope/rename", json={"to": "x"}).status_code == 404
    thumb = registered.get("/v1/classes/space rocket/thumbnail")  # the thumbnail follows the rename
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as img:
        assert img.format == "JPEG" and max(img.size) <= 128
    assert registered.delete("/v1/classes/space rocket").json() == {"removed": "space rocket"}
    assert registered.delete("/v1/classes/space rocket").status_code == 404
    assert registered.get("/v1/classes/space rocket/thumbnail").status_code == 404
    assert "space rocket" not in [c["label"] for c in registered.get("/v1/classes").json()]


def test_unknown_routes_methods_and_parameters_get_json_errors(registered):
    r = registered.get("/v1/nothing-here")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]
    assert registered.put("/v1/predict").status_code == 405
    assert "error" in registered.put("/v1/predict").json()
    for top_k in ("0", "abc", "100000"):
        r = registered.post("/v1/predict", params={"top_k": top_k}, files=files(("a.jpg", b"x")))
        assert r.status_code == 400 and "top_k" in r.json()["error"], r.text


def test_info_metrics_openapi_and_cors_only_for_the_origins_given(registered):
    info = registered.get("/v1/info").json()
    assert info["encoder"]["name"] == "efficientnet_lite0" and info["metric"] == "cosine"
    assert {"fewshot", "torch", "faiss"} <= info["versions"].keys()
    metrics = registered.get("/metrics").text
    assert 'fewshot_requests_total{endpoint="predict",method="POST",status="200"}' in metrics
    assert "fewshot_batch_size_count" in metrics and "fewshot_classes 2" in metrics
    assert 'fewshot_errors_total{status="400"}' in metrics
    paths = registered.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/classes", "/v1/info", "/healthz", "/readyz", "/metrics"} <= paths.keys()
    r = registered.get("/v1/classes", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = registered.get("/v1/classes", headers={"Origin": "https://till.example"})
    assert r.headers["access-control-allow-origin"] == "https://till.example"


def test_a_registration_keeps_the_good_files_and_lists_the_bad(registered, server, images):
    r = registered.post("/v1/classes/coffee/images", files=files(("good.jpg", images["coffee"][3]),
                                                                  ("bad.jpg", b"\xff\xd8 cut short")))
    report = r.json()
    assert r.status_code == 200 and report["added"] == 1
    assert len(report["errors"]) == 1 and report["errors"][0].startswith("bad.jpg")
    assert Registry.load(server.registry).count("coffee") == report["total"]


def test_concurrent_predictions_are_batched_while_a_writer_adds(registered, images):
    def batches():
        text = registered.get("/metrics").text
        value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                 if line.startswith("fewshot_batch_size_")}
        return value["fewshot_batch_size_count"], value["fewshot_batch_size_sum"]

    count0, sum0 = batches()
    queries = [images["cat"][i % 4] if i % 2 else images["coffee"][i % 4] for i in range(32)]

    def ask(i):
        r = registered.post("/v1/predict", files=files((f"q{i}.jpg", queries[i])))
        return r.status_code, r.json()[0]["label"]

    with ThreadPoolExecutor(8) as pool:
        answers = pool.map(ask, range(32))
        added = registered.post("/v1/classes/coffee/images", files=files(("c.jpg", images["coffee"][3])))
        answers = list(answers)
    assert added.status_code == 200
    assert answers == [(200, "cat" if i % 2 else "coffee") for i in range(32)]
    count1, sum1 = batches()
    assert sum1 - sum0 == 32
    assert (sum1 - sum0) / (count1 - count0) > 1.5  # several requests per model call


def test_a_large_image_delays_only_its_own_request(registered, images):
    big = io.BytesIO()
    gradient = Image.linear_gradient("L").resize((6000, 6000))
    colour = Image.merge("RGB", (gradient, gradient.rotate(90), gradient.transpose(Image.FLIP_TOP_BOTTOM)))
    colour.save(big, format="PNG")  # 36 MP in a 120 kB file: decoding takes ~0.5 s on a quiet core
    finished = {}

    def ask(name: str, data: bytes) -> None:
        r = registered.post("/v1/predict", files=files((name, data)))
        assert r.status_code == 200 and r.json()[0]["error"] is None, r.text
        finished[name] = time.perf_counter()

    large = threading.Thread(target=ask, args=("big.png", big.getvalue()))
    large.start()
    time.sleep(0.1)  # the large upload is in, and decoding
    ask("small.jpg", images["cat"][3])
    large.join()
    assert finished["small.jpg"] < finished["big.png"]  # decoded beside it, batched without waiting for it


def test_a_second_writer_gets_the_lock_error_at_once(registered, server, images, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "fewshot", "serve", str(server.registry), "--port",
                             str(free_port())],
                            capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 1 and "open for writing by process" in second.stderr
    photo = tmp_path / "p.jpg"
    photo.write_bytes(images["cat"][0])
    cli = subprocess.run([sys.executable, "-m", "fewshot", "register", str(server.registry), "--class", "x",
                          str(photo)], capture_output=True, text=True, env=env, timeout=120)
    assert cli.returncode == 1 and "open for writing by process" in cli.stderr
    assert time.monotonic() - started < 60  # no waiting for the lock: only Python's start-up
    assert registered.get("/readyz").status_code == 200


def test_another_address_needs_an_api_key(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "fewshot", "serve", str(tmp_path / "reg"), "--host", "0.0.0.0"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "--api-key-file" in r.stderr
    assert not (tmp_path / "reg").exists()
    (tmp_path / "short").write_text("abc\n")
    r = subprocess.run([sys.executable, "-m", "fewshot", "serve", str(tmp_path / "reg"), "--api-key-file",
                        str(tmp_path / "short")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "at least 16 characters" in r.stderr


def test_sigkill_while_clients_register_loses_no_acknowledged_change(tmp_path, images):
    server = start_server(tmp_path / "reg")
    no_cors = httpx.get(f"{server.url}/v1/classes", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in no_cors.headers  # none unless --cors-origin asks
    acknowledged: list[str] = []
    stop = threading.Event()
    two_images = files(("a.jpg", images["cat"][0]), ("b.jpg", images["coffee"][0]))

    def register(worker: int):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for i in range(1000):
                if stop.is_set():
                    return
                label = f"class-{worker}-{i}"
                try:
                    r = c.post(f"/v1/classes/{label}/images", files=two_images)
                except httpx.TransportError:
                    return  # killed mid-request: not acknowledged
                if r.status_code == 200:
                    acknowledged.append(label)

    threads = [threading.Thread(target=register, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    stop.set()
    for t in threads:
        t.join()
    assert len(acknowledged) >= 12
    registry = Registry.load(server.registry)  # checksums verified: nothing torn
    counts = registry.counts
    assert set(acknowledged) <= counts.keys()
    assert set(counts.values()) == {2}  # no class holds half of a registration
    for label in counts:  # and each has the thumbnail that came in the same save
        assert registry.thumbnail(label)[:2] == b"\xff\xd8"
    json.loads((server.registry / "manifest.json").read_text())


def png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.linear_gradient("L").resize(size).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, encoder, photos):
    """A server with small limits, over a registry that the CLI's way (file paths) started."""
    root = tmp_path_factory.mktemp("guarded")
    private = root / "private-server-folder"
    private.mkdir()
    (private / "cat.jpg").write_bytes(jpeg(Image.open(photos["chelsea"])))
    with FewShotClassifier.open(root / "reg", encoder=encoder, cache=False) as clf:
        clf.register("from the cli", [private / "cat.jpg"])
    srv = start_server(root / "reg", "--header-timeout", "1", "--body-timeout", "1", "--max-connections", "24",
                       "--max-image-mp", "1", "--max-request-mp", "2")
    yield srv
    srv.stop()


def test_junk_methods_and_paths_leave_metrics_bounded(server, registered):
    def junk(n: int) -> None:
        rng = random.Random(n)
        with httpx.Client(base_url=server.url, timeout=30) as anonymous:
            for i in range(n):
                method = "".join(rng.choices(string.ascii_uppercase, k=6))
                path = "/" + "".join(rng.choices(string.ascii_lowercase, k=10))
                anonymous.request(method, rng.choice([path, "/v1/predict", "/v1/classes/x" + path]),
                                  headers={"X-API-Key": KEY} if i % 2 else {})

    junk(60)
    first = registered.get("/metrics").text
    junk(300)
    second = registered.get("/metrics").text
    assert len(second.splitlines()) == len(first.splitlines())  # the same series, only larger counts
    assert 'method="other"' in second and 'endpoint="unmatched"' in second


def test_pixel_limits_refuse_before_decoding(guarded):
    with httpx.Client(base_url=guarded.url, timeout=60) as c:
        huge_jpeg = jpeg(Image.linear_gradient("L").resize((3000, 3000)))  # 9 MP, decodes at 1/8 (0.14 MP)
        r = c.post("/v1/predict", files=files(("big.png", png((1200, 1000))), ("big.jpg", huge_jpeg)))
        assert r.status_code == 200
        big_png, big_jpg = r.json()
        assert big_png["label"] is None and big_png["error"].startswith("big.png: 1200 x 1000 pixels (1.2 MP)")
        assert "1 MP per image (--max-image-mp)" in big_png["error"]
        assert big_jpg["error"] is None and big_jpg["top_k"]
        r = c.post("/v1/predict", files=files(*[(f"p{i}.png", png((900, 900))) for i in range(3)]))
        assert r.status_code == 413 and "2 MP per request (--max-request-mp)" in r.json()["error"]
        r = c.post("/v1/classes/big/images", files=files(("big.png", png((1200, 1000)))))
        assert r.status_code == 400 and "1 MP per image" in r.json()["error"]
        assert "big" not in [c["label"] for c in c.get("/v1/classes").json()]


def open_connections(pid: int) -> int:
    return sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in os.listdir(f"/proc/{pid}/fd"))


def test_slow_clients_are_cut_while_healthz_answers(guarded):
    host, port = guarded.url.removeprefix("http://").split(":")
    half_sent = [b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n",  # headers never finished
                 b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\npartial", b""]
    slow = []
    try:
        for i in range(12):
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(half_sent[i % 3])
            slow.append(sock)
        started = time.monotonic()
        assert httpx.get(f"{guarded.url}/healthz", timeout=5).status_code == 200
        assert time.monotonic() - started < 0.9  # answered while the slow ones wait
        for sock in slow:  # each is answered 408 and closed after its 1 s timeout
            got = b""
            while chunk := sock.recv(4096):
                got += chunk
            assert got.startswith(b"HTTP/1.1 408") and b"more than 1 s" in got
        assert time.monotonic() - started < 4
    finally:
        for sock in slow:
            sock.close()


def test_connections_beyond_the_cap_are_closed_at_once(guarded):
    host, port = guarded.url.removeprefix("http://").split(":")
    pid = guarded.process.pid
    before = open_connections(pid)
    flood = [socket.create_connection((host, int(port)), timeout=5) for _ in range(60)]
    try:
        time.sleep(0.3)
        assert open_connections(pid) <= before + 24 + 1  # descriptors stay bounded by --max-connections
        deadline = time.monotonic() + 5
        while True:  # once the idle ones are cut (1 s), the service answers again
            try:
                if httpx.get(f"{guarded.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "/healthz did not answer after the slow clients were cut"
            time.sleep(0.2)
    finally:
        for sock in flood:
            sock.close()


def test_any_label_can_be_added_renamed_and_removed(guarded, photos):
    label = "two\nlines"
    with httpx.Client(base_url=guarded.url, timeout=60) as c:
        photo = jpeg(Image.open(photos["coffee"]))
        r = c.post(f"/v1/classes/{quote(label, safe='')}/images", files=files(("a.jpg", photo)))
        assert r.status_code == 200 and r.json()["label"] == label
        assert c.get(f"/v1/classes/{quote(label, safe='')}/thumbnail").status_code == 200
        r = c.post(f"/v1/classes/{quote(label, safe='')}/rename", json={"to": "still\ntwo"})
        assert r.status_code == 200
        assert c.delete(f"/v1/classes/{quote('still' + chr(10) + 'two', safe='')}").json() == {"removed": "still\ntwo"}
        r = c.delete("/v1/classes/never")
        assert r.status_code == 404 and "GET /v1/classes" in r.json()["error"]
        assert "Registry" not in r.json()["error"]


def test_deeply_nested_json_is_a_400(guarded):
    with httpx.Client(base_url=guarded.url, timeout=60) as c:
        r = c.post("/v1/classes/x/rename", content=b"[" * 100_000, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "to" in r.json()["error"]


def test_duplicate_warning_names_the_upload_not_a_server_path(guarded, photos):
    with httpx.Client(base_url=guarded.url, timeout=60) as c:
        same = jpeg(Image.open(photos["chelsea"]))
        r = c.post("/v1/classes/tabby/images", files=files(("upload.jpg", same)))
        assert r.status_code == 200
        warnings = "\n".join(r.json()["warnings"])
        assert "'upload.jpg'" in warnings and "'from the cli'" in warnings
        assert "private-server-folder" not in warnings and str(guarded.registry.parent) not in warnings
        c.delete("/v1/classes/tabby")


def test_info_shows_the_fitted_unknown_thresholds(registered):
    threshold = registered.get("/v1/info").json()["threshold"]
    assert threshold["source"] == "fitted" and threshold["method"] == "leave-one-out"
    assert isinstance(threshold["pooled"], float) and 0 < threshold["target_tpr"] <= 1
    assert {"one_shot", "per_class"} <= threshold.keys()


def test_busy_port_is_one_clear_error(server, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    port = server.url.rsplit(":", 1)[1]
    r = subprocess.run([sys.executable, "-m", "fewshot", "serve", str(tmp_path / "reg"), "--port", port],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and r.stdout == ""  # no "on http://..." line for a server that never ran
    assert r.stderr.strip().splitlines() == [f"fewshot: error: cannot listen on 127.0.0.1:{port}: Address already in "
                                             "use; another program (another fewshot serve?) is listening there; "
                                             "pick another --port"]
    assert not (tmp_path / "reg").exists()


def test_listen_gives_a_tcp_socket_asyncio_sets_nodelay_on():
    from fewshot.serve import listen

    with listen("127.0.0.1", 0) as sock:  # proto 0 would leave Nagle on: ~40 ms more per response
        assert sock.proto == socket.IPPROTO_TCP
        with pytest.raises(OSError, match="Address already in use; another program"):
            listen("127.0.0.1", sock.getsockname()[1])
