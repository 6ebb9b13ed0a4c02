"""A warm captioning service: an HTTP API, a web page and a camera mode over one loaded model.

``captioning serve --model DIR`` runs :func:`create_app` under uvicorn. The model loads once;
requests that arrive together are batched (:class:`Batcher`): the images of every request in
the queue go through one encoder call and one compiled search per set of decoding settings, so
throughput grows with load while one client waits only for its own caption.

Safe by default: it binds 127.0.0.1 unless told otherwise and then needs a bearer token; it reads
only uploaded bytes (never a path or URL a client names); the body's size, an image's pixels,
the images per request and the queue are bounded (past the queue a 503 with Retry-After); a
client that stops sending its body is cut off; every bad request is a 4xx with a one-line JSON
``{"error": ...}``, and the server goes on serving.
"""

import asyncio
import dataclasses
import hmac
import io
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np

from .decode import Decoding
from .errors import CaptioningError
from .images import ImageError, load_image

DECODING_FIELDS = {f.name for f in dataclasses.fields(Decoding)}

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 20 * 2**20  # a request's whole body
    max_pixels: int = 40_000_000  # per image, checked from its header before decoding
    max_images: int = 16  # per request
    max_queue: int = 64  # images waiting or being captioned; more: 503
    body_timeout_s: float = 10.0  # longest wait for the next piece of a request's body
    max_batch: int = 32  # images per encoder call
    batch_window_ms: float = 5.0  # how long the first request waits for others to join it


class RequestError(Exception):
    """A bad request: ``status`` and a one-line message for the client."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def decode_upload(data: bytes, size: int, max_pixels: int, name: str) -> np.ndarray:
    """An uploaded file's bytes -> (size, size, 3) uint8, refusing a decompression bomb from its
    header (before any pixel is decoded)."""
    from PIL import Image

    if not data:
        raise RequestError(400, f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                w, h = img.size
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"{name}: too many pixels ({e})") from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise RequestError(415, f"{name}: not an image file PIL can read") from None
    if w * h > max_pixels:
        raise RequestError(413, f"{name}: {w} x {h} pixels (at most {max_pixels:,})")
    try:
        return load_image(data, size, dtype=np.uint8)
    except ImageError as e:
        raise RequestError(422, f"{name}: {e}") from None


@dataclasses.dataclass
class _Job:
    arrays: list  # (S, S, 3) uint8 images
    settings: tuple  # (Decoding, attention): jobs with equal settings share a search
    future: asyncio.Future


class Batcher:
    """Collects requests, then captions them together in one worker thread: one encoder call, one
    search per settings group. It waits for more (up to ``batch_window_ms``, or ``max_batch``
    images) only while other requests are still being read: a lone client never waits."""

    def __init__(self, captioner, limits: Limits):
        self.captioner, self.limits = captioner, limits
        self.queue: asyncio.Queue | None = None
        self.pending = 0  # images accepted and not yet answered
        self.arriving = 0  # requests being read and decoded: worth waiting for
        self.batches = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caption")
        self._task = None

    def start(self):
        self.queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self):
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._pool.shutdown(wait=True)

    async def submit(self, arrays, settings) -> tuple:
        if self.pending + len(arrays) > self.limits.max_queue:
            raise RequestError(503, "busy: the queue is full, retry shortly", {"Retry-After": "1"})
        self.pending += len(arrays)
        job = _Job(arrays, settings, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        try:
            return await job.future
        finally:
            self.pending -= len(arrays)

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            size = len(jobs[0].arrays)
            deadline = loop.time() + self.limits.batch_window_ms / 1000
            while size < self.limits.max_batch and (self.arriving or not self.queue.empty()):
                try:
                    job = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                size += len(job.arrays)
            self.batches += 1
            try:
                results = await loop.run_in_executor(self._pool, self._caption, jobs)
            except Exception as e:  # a failure in the model answers these requests, not the server
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            for job, result in zip(jobs, results):
                if not job.future.done():  # the client may have gone
                    job.future.set_result(result)

    def _caption(self, jobs):
        """In the worker thread: encode every image at once, then search per settings group."""
        t0 = time.perf_counter()
        feats = self.captioner.encode(np.stack([a for job in jobs for a in job.arrays]))
        encode_s = time.perf_counter() - t0
        rows, at = [], 0
        for job in jobs:
            rows.append(range(at, at + len(job.arrays)))
            at += len(job.arrays)
        out = [None] * len(jobs)
        for settings in dict.fromkeys(job.settings for job in jobs):
            members = [i for i, job in enumerate(jobs) if job.settings == settings]
            index = [r for i in members for r in rows[i]]
            t1 = time.perf_counter()
            caps = self.captioner.caption_features(feats[index], *settings)  # (decoding, attention)
            search_s = time.perf_counter() - t1
            for i in members:
                n = len(jobs[i].arrays)
                timings = {"encode_ms": 1000 * encode_s, "search_ms": 1000 * search_s, "batch_images": at}
                out[i], caps = (caps[:n], timings), caps[n:]
        return out


def create_app(captioner, limits: Limits = Limits(), token: str | None = None, defaults: Decoding = Decoding()):
    """The ASGI app: ``GET /`` (the page), ``GET /health``, ``GET /model``, ``POST /caption``."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Query, Request
    from fastapi.responses import HTMLResponse

    batcher = Batcher(captioner, limits)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="captioning", version=_version(), lifespan=lifespan)
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s)

    install_error_handlers(app)

    def check_token(request: Request):
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files("captioning").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue": batcher.pending, "auth": token is not None}

    @app.get("/model")
    async def model_info(request: Request):
        check_token(request)
        m = captioner.model
        return {
            "decoder": m.config.get("decoder"),
            "settings": m.decoder.settings(),
            "encoder": {**m.encoder.attrs(), "bundled": m.encoder_file is not None},
            "vocab_size": len(m.vocab),
            "image_size": captioner.image_size,
            "grid": list(_grid(m.decoder.num_locations)),
            "attention": captioner.attends,
            "defaults": dataclasses.asdict(defaults),
            "limits": dataclasses.asdict(limits),
        }

    @app.post("/caption")
    async def caption(
        request: Request,
        beam_size: int = Query(defaults.beam_size, ge=1, le=20),
        max_length: int = Query(defaults.max_length, ge=1, le=100),
        length_penalty: float = Query(defaults.length_penalty, ge=0.0, le=5.0),
        attention: bool = Query(False, description="per-word attention maps"),
        n_best: int = Query(1, ge=1, le=20, description="captions per image (at most beam_size)"),
        groups: int = Query(1, ge=1, le=20, description="diverse beam search: groups of beams"),
        diversity: float = Query(0.0, ge=0.0, le=10.0, description="diverse beam search: Hamming penalty"),
        include: list[str] = Query([], description='words the caption must contain: "dog|dogs", "red shirt"'),
        block_trigrams: bool = Query(False),
        sample: int = Query(0, ge=0, le=20, description="draw this many captions instead of searching"),
        temperature: float = Query(1.0, gt=0.0, le=10.0),
        top_k: int = Query(0, ge=0),
        top_p: float = Query(1.0, gt=0.0, le=1.0),
        seed: int = Query(0, ge=0),
    ):
        """Caption the images uploaded as multipart form files (field ``images``, one or more)."""
        check_token(request)
        settings = {k: v for k, v in locals().items() if k in DECODING_FIELDS}
        return await caption_request(request, captioner, batcher, limits, settings, attention)

    return app


def install_error_handlers(app):
    """Every error a client causes as a 4xx with a one-line JSON ``{"error": ...}``."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error(status, message, headers=None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return error(e.status, e.message, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "query")
        return error(422, f"{where}: {first.get('msg', 'invalid')}")


async def caption_request(request, captioner, batcher, limits, settings, attention) -> dict:
    """``POST /caption``: read and decode the uploads, then caption them in the batcher's next batch."""
    from starlette.concurrency import run_in_threadpool

    batcher.arriving += 1  # the batcher waits for requests still being read
    try:
        try:
            decoding = Decoding(**settings)
        except CaptioningError as e:
            raise RequestError(422, str(e)) from None
        if attention and not captioner.attends:
            raise RequestError(400, "this model's decoder does not attend: no attention maps")
        uploads = await read_uploads(request, limits.max_images)
        t0 = time.perf_counter()
        size = captioner.image_size
        # PIL decodes outside the event loop (it releases the GIL), so other requests keep flowing.
        arrays = await run_in_threadpool(
            lambda: [decode_upload(data, size, limits.max_pixels, name) for name, data in uploads]
        )
        read_ms = 1000 * (time.perf_counter() - t0)
    finally:
        batcher.arriving -= 1
    try:
        caps, timings = await batcher.submit(arrays, (decoding, attention))
    except CaptioningError as e:  # e.g. a constraint word the model does not know
        raise RequestError(422, str(e)) from None
    return {
        "captions": [{"filename": name, **c.to_json()} for (name, _), c in zip(uploads, caps)],
        "grid": list(_grid(captioner.model.decoder.num_locations)),
        "timings": {"read_ms": read_ms, **timings, "total_ms": 1000 * (time.perf_counter() - t0)},
    }


async def read_uploads(request, max_images) -> list:
    """``[(filename, bytes)]`` of the request's multipart files; RequestError for anything else."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        raise RequestError(415, f"send multipart/form-data with image files (got {kind or 'no content type'!r})")
    try:
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 8)
    except (HTTPException, MultiPartException, ValueError, KeyError) as e:  # malformed, too many parts, no boundary
        raise RequestError(400, f"malformed multipart body: {getattr(e, 'detail', e)}") from None
    uploads, texts = [], []
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            uploads.append((value.filename or key, await value.read()))
        else:
            texts.append(key)
    if texts and not uploads:
        raise RequestError(
            422, f"field {texts[0]!r} is text: upload the image's bytes as a file (paths and URLs are not read)"
        )
    if not uploads:
        raise RequestError(400, "no image files in the request (multipart field 'images')")
    if len(uploads) > max_images:
        raise RequestError(413, f"{len(uploads)} images in one request (at most {max_images})")
    return uploads


class BodyLimit:
    """ASGI middleware: reads a request's whole body before the app sees it, refusing one over
    ``max_bytes`` (413, from Content-Length when it says so) and one whose next piece does not
    come within ``timeout_s`` (408), so a slow or endless upload never holds the app."""

    def __init__(self, app, max_bytes, timeout_s):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _refuse(send, 413, f"body of {int(length):,} bytes (at most {self.max_bytes:,})")
        body, more = bytearray(), True
        while more:
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                return await _refuse(send, 408, f"the body did not arrive within {self.timeout_s:g} s")
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _refuse(send, 413, f"body over {self.max_bytes:,} bytes")
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(send, status, message):
    import json

    payload = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*headers, (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


def _grid(num_locations):
    from .feature_store import square_grid

    return square_grid(num_locations)


def _version():
    from . import __version__

    return __version__


def warm_up(captioner, max_batch, defaults: Decoding):
    """Compile the encoder and the default search for every batch size the batcher can form
    (powers of two: see graph_search), so no client waits for a compilation."""
    size, n = captioner.image_size, 1
    while True:
        feats = captioner.encode(np.zeros((min(n, max_batch), size, size, 3), np.uint8))
        captioner.caption_features(feats, defaults)
        if n >= max_batch:
            return
        n *= 2


def serve(model_dir, host="127.0.0.1", port=8000, token=None, limits=Limits(), defaults=Decoding(), log=print):
    """Load the model, warm it up, and serve until Ctrl-C / SIGTERM (in-flight requests finish)."""
    import uvicorn

    from .inference import Captioner

    if host not in LOOPBACK and not token:
        raise CaptioningError(f"--host {host}: reachable from other machines, so a token is required (--token)")
    captioner = Captioner.load(model_dir)
    warm_up(captioner, limits.max_batch, defaults)
    app = create_app(captioner, limits, token, defaults)
    log(f"serve: {model_dir} on http://{host}:{port}/ (API: POST /caption, docs: /docs)")
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
