"""The demo's web server: an ASGI app (Starlette) over a Classifier, run by uvicorn on 127.0.0.1.

    GET  /                  the page, static/index.html (its files under /static/)
    POST /api/classify      an image (PNG, JPEG, WebP or BMP) as the body, or as the multipart field
                            "image" -> Classifier.classify's JSON and "input": what the net sees,
                            a PNG in base64
    GET  /api/classes       {"classes", "backend", "teaching"}
    POST /api/teach         {"name": "...", "images": ["<base64 image>", ...]} or the multipart
                            fields "name" and "images" (MIN_EXAMPLES to MAX_EXAMPLES files)
                            -> 202 {"id"}: the class is taught in the background
    GET  /api/teach/{id}    {"id", "name", "iteration", "iterations", "loss", "done", "error",
                            "seconds", "accuracy": {"old_before", "old_after", "new"}}
    GET  /api/model?format= the served model as a file: caffemodel, prototxt, labels, espz, onnx,
                            coreml (a zipped .mlpackage)
    POST /api/reset         back to the model as loaded

Every error is a 4xx (5xx: the server's fault) with {"error": message}.  Safe by default: a
request body may hold MAX_BODY bytes (MAX_TEACH_BODY to teach; counted while it is read), an
image MAX_PIXELS pixels (checked from its header, before it is decoded) in one of four formats;
at most WORKERS images are decoded at once and uvicorn serves at most MAX_CONCURRENT requests,
so memory stays bounded however many clients come; no value of a request names a file (static
files are Starlette's StaticFiles, which stays inside its directory).
"""

import base64
import binascii
import collections
import contextlib
import io
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import anyio
import numpy as np
from PIL import Image, UnidentifiedImageError

from espresso.demo.classifier import ITERATIONS, MAX_EXAMPLES, MIN_EXAMPLES, SCALE, Busy, DemoError
from espresso.demo.exports import EXPORTS
from espresso.demo.preprocess import to_input
from espresso.errors import EspressoError
from espresso.runtime import set_num_threads

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError:
    raise EspressoError("espresso demo needs Starlette, uvicorn and python-multipart: "
                        "pip install 'espresso-nn[demo]'") from None

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY = 10 << 20  # bytes of a request
MAX_TEACH_BODY = 32 << 20  # bytes of a teaching request (MAX_EXAMPLES photos)
MAX_PIXELS = 25_000_000  # of an image (a 24 MP photo); below Pillow's own bomb limit, so ours speaks first
MIN_SIDE = 8  # pixels
FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
DRAFT = 512  # a JPEG is decoded at the smallest 1/2..1/8 scale with both sides above this: enough for 28x28
WORKERS = 4  # images decoded and classified at once
MAX_CONCURRENT = 200  # connections and requests in progress; uvicorn answers 503 beyond
KEEP_JOBS = 32  # teaching jobs whose status is kept

log = logging.getLogger("espresso")


class ApiError(Exception):
    """A refused request: the HTTP status and the message the client gets."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


# *** the app ***
def create_app(classifier, static_dir=STATIC_DIR):
    """The Starlette app serving `classifier` and the page in `static_dir`."""
    if classifier.input_shape[0] != 1:
        raise DemoError(f"the demo makes grey images for 1-channel nets; this one takes {classifier.input_shape}")
    static_dir = Path(static_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.workers = anyio.CapacityLimiter(WORKERS)
        yield

    routes = [Route("/", lambda request: _index(static_dir)),
              Route("/api/classify", classify, methods=["POST"]),
              Route("/api/classes", classes),
              Route("/api/teach", teach, methods=["POST"]),
              Route("/api/teach/{id}", teach_status),
              Route("/api/model", model_file),
              Route("/api/reset", reset, methods=["POST"]),
              Mount("/static", StaticFiles(directory=static_dir, check_dir=False), name="static")]
    handlers = {ApiError: lambda request, e: _error(e.status, e.message),
                HTTPException: lambda request, e: _error(e.status_code, e.detail, e.headers),
                Busy: lambda request, e: _error(409, str(e)),
                DemoError: lambda request, e: _error(400, str(e)),
                EspressoError: lambda request, e: _error(500, str(e)),
                Exception: lambda request, e: _error(500, f"internal error ({type(e).__name__})")}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.classifier, app.state.jobs = classifier, Jobs(classifier)
    return app


def serve(classifier, host="127.0.0.1", port=8000, static_dir=STATIC_DIR):
    """Run the demo's server until interrupted."""
    import uvicorn

    if classifier.backend == "cpu" and not os.environ.get("ESPRESSO_NUM_THREADS"):
        # batch-1 forwards: one BLAS thread is as fast, and does not stall when another program holds
        # a core (LeNet here: 0.2 ms, against 24 ms on 2 threads beside a busy process; see also
        # benchmarks/results/threads.txt)
        set_num_threads(1)
    app = create_app(classifier, static_dir)
    print(f"Espresso demo on http://{host}:{port}/ ({len(classifier.labels)} classes, {classifier.backend}); "
          "Ctrl-C stops it", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", limit_concurrency=MAX_CONCURRENT)


def _error(status, message, headers=None):
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _index(static_dir):
    page = static_dir / "index.html"
    if not page.is_file():
        raise ApiError(404, "the page is missing (espresso/demo/static/index.html); the API is under /api/")
    return FileResponse(page)


async def _work(request, function, *args):
    """function(*args) in a worker thread: at most WORKERS at once."""
    return await anyio.to_thread.run_sync(function, *args, limiter=request.app.state.workers)


# *** routes ***
async def classify(request):
    body = await read_body(request)
    if _is_multipart(request):
        async with _form(request, body, max_files=1, max_fields=0) as form:
            data = await _file_bytes(form.get("image"), "image")
    else:
        data = body
    return JSONResponse(await _work(request, _classify, request.app.state.classifier, data))


def _classify(classifier, data):
    x = _input(classifier, data)
    return {**classifier.classify(x), "input": _png_base64(x)}


async def classes(request):
    classifier = request.app.state.classifier
    return JSONResponse({"classes": classifier.labels, "backend": classifier.backend,
                         "teaching": classifier.teaching})


async def teach(request):
    body = await read_body(request, MAX_TEACH_BODY)
    if _is_multipart(request):
        async with _form(request, body, max_files=MAX_EXAMPLES, max_fields=1) as form:
            name = form.get("name")
            images = [await _file_bytes(f, "images") for f in form.getlist("images")]
    else:
        name, images = _teach_json(body)
    if not isinstance(name, str):
        raise ApiError(400, 'give the class a "name"')
    if not MIN_EXAMPLES <= len(images) <= MAX_EXAMPLES:
        raise ApiError(400, f"give {MIN_EXAMPLES} to {MAX_EXAMPLES} images, got {len(images)}")
    classifier = request.app.state.classifier
    name = classifier.check_name(name)  # now, not in the background job
    inputs = await _work(request, lambda: [_input(classifier, data) for data in images])
    return JSONResponse({"id": request.app.state.jobs.start(name, inputs)}, status_code=202)


def _teach_json(body):
    """(name, [image bytes]) of a JSON teach request."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not JSON: {e}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
        raise ApiError(400, 'expected {"name": "...", "images": ["<base64 image>", ...]}')
    return payload.get("name"), [_base64(item) for item in payload["images"]]


def _base64(item):
    """The bytes of a base64 string, or of a data: URL as a canvas makes it."""
    if not isinstance(item, str):
        raise ApiError(400, "each image must be a base64 string")
    data = item.partition(",")[2] if item.startswith("data:") else item
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "an image is not valid base64") from None


async def teach_status(request):
    job = request.app.state.jobs.status(request.path_params["id"])
    if job is None:
        raise ApiError(404, "no such teaching job")
    return JSONResponse(job)


async def model_file(request):
    format = request.query_params.get("format", "caffemodel")
    if format not in EXPORTS:
        raise ApiError(400, f"unknown format '{format}' (known: {', '.join(EXPORTS)})")
    data = await _work(request, request.app.state.classifier.export, format)
    _, filename, media_type = EXPORTS[format]
    return Response(data, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{filename}"'})


async def reset(request):
    request.app.state.classifier.reset()
    return JSONResponse({"classes": request.app.state.classifier.labels})


# *** reading requests ***
async def read_body(request, limit=MAX_BODY):
    """The request's body, refused (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request has {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _is_multipart(request):
    return request.headers.get("content-type", "").startswith("multipart/form-data")


def _form(request, body, max_files, max_fields):
    """The multipart form in `body` (read already, within the limit), as Starlette parses it."""
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive).form(max_files=max_files, max_fields=max_fields, max_part_size=1024)


async def _file_bytes(upload, field):
    if upload is None or isinstance(upload, str):
        raise ApiError(400, f"the multipart field '{field}' must be a file")
    return await upload.read()


# *** images ***
def _input(classifier, data):
    """An uploaded image as the net's input (espresso.demo.preprocess.to_input)."""
    return to_input(decode_image(data), size=classifier.input_shape[1:])


def decode_image(data):
    """The bytes of a PNG, JPEG, WebP or BMP image as an HxWx3 uint8 array (HxWx4 when it has
    transparency); ApiError for anything else, too large or too small."""
    if not data:
        raise ApiError(400, "no image in the request")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            _check_size(*im.size)
            im.draft(None, (DRAFT, DRAFT))
            return np.asarray(im.convert("RGBA" if im.has_transparency_data else "RGB"))
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # sizes beyond Pillow's limit
        raise ApiError(413, f"the image has more than {MAX_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise ApiError(415, f"not an image in a known format ({', '.join(FORMATS)})") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, EOFError, ValueError... on damaged files
        raise ApiError(400, f"the image cannot be decoded ({type(e).__name__}: {e})") from None


def _check_size(width, height):
    if width * height > MAX_PIXELS:
        raise ApiError(413, f"the image is {width}x{height}, more than {MAX_PIXELS} pixels")
    if min(width, height) < MIN_SIDE:
        raise ApiError(400, f"the image is {width}x{height}; each side needs {MIN_SIDE} pixels or more")


def _png_base64(x):
    """The net's input (1, H, W) as a grey PNG in base64: what the net sees."""
    pixels = np.clip(np.rint(x[0] / SCALE), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


# *** teaching jobs ***
class Jobs:
    """Teaching jobs, one at a time, each in a thread; the last KEEP_JOBS are kept for their status."""

    def __init__(self, classifier):
        self.classifier, self.lock, self.jobs = classifier, threading.Lock(), collections.OrderedDict()

    def start(self, name, inputs):
        """Start teaching `name` from `inputs`; the job's id (409 while another one runs)."""
        with self.lock:
            if self.classifier.teaching or any(not job["done"] for job in self.jobs.values()):
                raise ApiError(409, "a class is being taught; wait until it is done")
            job = {"id": uuid.uuid4().hex, "name": name, "iteration": 0, "iterations": ITERATIONS, "loss": None,
                   "done": False, "error": None, "seconds": None, "accuracy": None}
            self.jobs[job["id"]] = job
            while len(self.jobs) > KEEP_JOBS:
                self.jobs.popitem(last=False)
        threading.Thread(target=self._run, args=(job, inputs), name=f"teach-{job['id']}", daemon=True).start()
        return job["id"]

    def _run(self, job, inputs):
        start = time.perf_counter()
        try:
            progress = lambda iteration, loss: self._update(job, iteration=iteration, loss=loss)
            result = self.classifier.teach(job["name"], inputs, progress=progress)
            outcome = {"iteration": result["iterations"], "loss": result["loss"], "accuracy": result["accuracy"]}
        except EspressoError as e:
            outcome = {"error": str(e)}
        except Exception as e:  # the job reports it, the log has its traceback, the server goes on
            log.exception("teaching '%s' failed", job["name"])
            outcome = {"error": f"internal error ({type(e).__name__}: {e})"}
        self._update(job, done=True, seconds=time.perf_counter() - start, **outcome)

    def _update(self, job, **fields):
        with self.lock:
            job.update(fields)

    def status(self, id):
        with self.lock:
            job = self.jobs.get(id)
            return None if job is None else dict(job)
