"""The HTTP service on a real uvicorn server (127.0.0.1, a free port) over the tiny pipeline's model:
the API round trip, batching under concurrency, every class of bad request, the token, overload,
graceful shutdown, and the web page in Debian's Chromium (upload and the fake camera)."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from benchmarks.bad_requests import bad_requests
from captioning.service import Limits, create_app


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn running ``app`` in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.app, self.port = app, free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def captioner(tiny_run):
    from captioning import Captioner

    return Captioner.load(tiny_run[0] / "models_final")


@pytest.fixture(scope="module")
def server(captioner):
    s = Server(create_app(captioner, Limits(max_images=4, max_queue=12, max_body_bytes=2**20, body_timeout_s=1.0)))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def photos(tiny_run):
    return sorted((tiny_run[0] / "data/shapes/images").glob("*.png"))[:6]


def post(url, files, params=None, **kw):
    return httpx.post(f"{url}/caption", files=[("images", f) for f in files], params=params, timeout=60, **kw)


def test_round_trip_health_model_info_and_schema(server, captioner, photos):
    r = post(server.url, [(p.name, p.read_bytes(), "image/png") for p in photos[:2]], {"beam_size": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    want = captioner.caption(photos[:2], beam_size=2)
    assert [c["caption"] for c in body["captions"]] == [c.text for c in want]
    assert [c["filename"] for c in body["captions"]] == [p.name for p in photos[:2]]
    np.testing.assert_allclose([c["log_prob"] for c in body["captions"]], [c.log_prob for c in want], atol=1e-5)
    assert {"read_ms", "encode_ms", "search_ms", "total_ms"} <= set(body["timings"])
    with_maps = post(server.url, [("a.png", photos[0].read_bytes())], {"attention": "true"}).json()["captions"][0]
    assert len(with_maps["attention"]) == len(with_maps["caption"].split())
    two = post(server.url, [("a.png", photos[0].read_bytes())], {"n_best": 2, "beam_size": 3}).json()["captions"][0]
    assert two["caption"] == post(server.url, [("a.png", photos[0].read_bytes())]).json()["captions"][0]["caption"]
    assert len(two["alternatives"]) == 1
    unknown = post(server.url, [("a.png", photos[0].read_bytes())], {"include": "zebra"})
    assert unknown.status_code == 422 and "not in the model's vocabulary" in unknown.json()["error"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    info = httpx.get(f"{server.url}/model").json()
    assert info["decoder"] == "gru" and info["image_size"] == captioner.image_size and info["attention"] is True
    assert "/caption" in httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert "getUserMedia" in httpx.get(server.url).text


def test_concurrent_requests_are_batched_and_answered_as_one_at_a_time(server, captioner, photos):
    batcher = server.app.state.batcher
    alone = {p.name: c.text for p, c in zip(photos, captioner.caption(photos))}
    before = batcher.batches
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda p: post(server.url, [(p.name, p.read_bytes())]), photos * 2))
    assert all(r.status_code == 200 for r in results)
    for r in results:
        (c,) = r.json()["captions"]
        assert c["caption"] == alone[c["filename"]]
    assert batcher.batches - before < len(results)  # some requests shared an encoder call
    assert max(r.json()["timings"]["batch_images"] for r in results) > 1


def test_every_bad_request_gets_a_clear_4xx_and_the_server_goes_on(server, photos):
    for name, (kwargs, status) in bad_requests(photos[0].read_bytes()).items():
        r = httpx.post(f"{server.url}/caption", timeout=60, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        body = r.json()
        if status == 200:
            assert isinstance(body["captions"][0]["caption"], str), name
        else:
            assert set(body) == {"error"} and "\n" not in body["error"] and body["error"], (name, body)
        good = post(server.url, [("ok.png", photos[0].read_bytes())])
        assert good.status_code == 200, (name, good.text)


def test_a_client_that_never_finishes_its_body_is_cut_off(server, photos):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 5000\r\n\r\n--x\r\n"
        )
        start = time.monotonic()
        reply = b""
        while chunk := s.recv(4096):  # until the server closes: the head and body may come apart
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408") and '"error"' in reply
    assert time.monotonic() - start < 5  # the server's 1 s body timeout, not the client's
    assert post(server.url, [("ok.png", photos[0].read_bytes())]).status_code == 200


def test_token_and_overload(captioner, photos):
    s = Server(create_app(captioner, Limits(max_queue=2), token="s3cret"))
    try:
        files = [("a.png", photos[0].read_bytes())]
        assert post(s.url, files).status_code == 401
        assert post(s.url, files, headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert post(s.url, files, headers=auth).status_code == 200
        assert httpx.get(f"{s.url}/model").status_code == 401
        assert httpx.get(f"{s.url}/health").json()["auth"] is True  # the page asks for a token
        busy = post(s.url, files * 3, headers=auth)  # 3 images, queue of 2
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "queue" in busy.json()["error"]
        assert post(s.url, files, headers=auth).status_code == 200
    finally:
        s.stop()


def test_a_server_open_to_other_machines_needs_a_token(tiny_run):
    from click.testing import CliRunner

    from captioning.commands import main as cli

    res = CliRunner().invoke(cli, ["serve", "--model", str(tiny_run[0] / "models_final"), "--host", "0.0.0.0"])
    assert res.exit_code == 1 and "a token is required" in res.output


def test_sigterm_finishes_the_request_in_flight_then_exits(tiny_run, photos):
    port = free_port()
    model = str(tiny_run[0] / "models_final")
    proc = subprocess.Popen(
        [sys.executable, "-m", "captioning", "serve", "--model", model, "--port", str(port), "--max-batch", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = httpx.Request(
            "POST", f"http://127.0.0.1:{port}/caption", files=[("images", ("a.png", photos[0].read_bytes()))]
        )
        raw = b"".join(body.stream)
        head = f"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Length: {len(raw)}\r\n"
        head += f"Content-Type: {body.headers['content-type']}\r\nConnection: close\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(head.encode() + raw[:100])  # the request is in flight ...
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)  # ... when the server is told to stop
            time.sleep(0.3)
            s.sendall(raw[100:])
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["captions"][0]["caption"] is not None
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    finally:
        if proc.poll() is None:
            proc.kill()


CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(not CHROMIUM, reason="Debian's chromium is not installed")
def test_the_page_captions_an_upload_and_the_fake_camera(server, photos):
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page()
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            page.set_input_files("#files", [str(photos[0])])
            page.wait_for_selector(".card .caption span", timeout=30_000)
            want = httpx.post(
                f"{server.url}/caption", files=[("images", ("x.png", photos[0].read_bytes()))], timeout=60
            ).json()["captions"][0]["caption"]
            assert page.inner_text(".card .caption").strip() == want
            page.hover(".card .caption span")  # draws that word's attention map
            page.click("#cam")
            page.wait_for_function("Number(document.getElementById('fps').dataset.frames || 0) >= 5", timeout=60_000)
            assert page.inner_text("#live").strip()
            assert float(page.get_attribute("#fps", "data-fps")) > 0
        finally:
            browser.close()
