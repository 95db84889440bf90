"""`dlip serve`: the demo web app (FastAPI + uvicorn) over one `Predictor`.

Routes: `GET /` (the page), `POST /api/caption` (multipart `image`) -> {"caption"},
`POST /api/itm` (`image`, `text`) -> {"score"}, `POST /api/vqa` (`image`, `question`) ->
{"answer"} (a VQA model; ranked from `--answers` when given, else generated),
`GET /api/search?q=&k=&rerank=` -> {"results": [{path, score, itc, itm, thumb}], "skipped": n}
(n: indexed files re-ranking could not read, left out), `GET /api/image/{i}` (a thumbnail of
the index's i-th image; only index entries are ever served), `GET /api/info` (with `tasks`:
what the loaded model can do). Every error is
`{"error": str}` with a 4xx code, its absolute paths cut to file names; a route the loaded
model cannot serve (captions from a VQA model, VQA from a captioner) is a 400 saying so.

Model calls run one at a time under a lock, in a worker thread, so the event loop keeps accepting
requests (and rejecting bad ones) while a caption is being generated. fastapi / uvicorn are
imported inside the functions that use them (the `serve` extra), so importing
`dlip.inference.serve` is cheap; hence no `from __future__ import annotations` here:
FastAPI must see the real `Request` class on the routes defined inside `create_app`.
"""

import io
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_TEXT_CHARS = 1000
MAX_K = 100
THUMB_SIZE = 256
THUMB_CACHE = 512  # thumbnails (~10-20 KB each) kept in memory
THUMB_DECODERS = 1  # index images decoded for thumbnails at once
THUMB_MAX_PIXELS = 64_000_000  # larger index images get no thumbnail (404)
T = TypeVar("T")


class UploadTooLarge(Exception):
    """The request body grew past the upload limit while it was being read."""


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class UploadLimit:
    """ASGI middleware: 413 for a declared Content-Length over the limit (before reading it), and
    `UploadTooLarge` from `receive` once a streamed (e.g. chunked) body passes the limit."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        seen = 0

        async def counting_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise UploadTooLarge
            return message

        await self.app(scope, counting_receive, send)

    async def _reject(self, send: Callable) -> None:
        body = _error_body(f"upload too large: the limit is {self.max_bytes} bytes")
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Service:
    """The app's state: one predictor (calls serialized by a lock; concurrent captions run as
    micro-batches of up to `max_batch`, gathered for `batch_wait_ms`), an optional image index,
    an optional VQA answer list (rank mode)."""

    def __init__(
        self,
        predictor: Any,
        index: Any | None = None,
        answers: list[str] | None = None,
        max_batch: int = 8,
        batch_wait_ms: float = 5.0,
    ) -> None:
        from dlip.inference.batching import MicroBatcher

        self.predictor = predictor
        self.index = index
        self.answers = answers
        self.lock = threading.Lock()
        self.captioner = MicroBatcher(predictor.caption, max_batch, batch_wait_ms, self.lock)
        self.positions: dict[str, int] = {}
        if index is not None:
            for i in range(len(index.paths)):
                self.positions.setdefault(index.path(i), i)
        # i -> (file signature, JPEG bytes or the ApiError it gave), most recently used last
        self._thumbs: OrderedDict[int, tuple[tuple[int, int], bytes | ApiError]] = OrderedDict()
        self._thumb_lock = threading.Lock()  # guards _thumbs and _pending
        self._pending: dict[int, list] = {}  # i -> [lock held while decoding i, requests using it]
        # A 62 MP PNG is ~190 MB of pixels while it decodes (PNG has no reduced-scale draft):
        # decodes run one at a time, whatever the number of requests.
        self._decode_slots = threading.Semaphore(THUMB_DECODERS)

    def locked(self, fn: Callable[[], T]) -> T:
        with self.lock:
            return fn()

    def tasks(self) -> list[str]:
        """What the loaded model serves: caption, itm and search, or vqa."""
        config = getattr(self.predictor.model, "config", None)
        if getattr(config, "vqa", False):
            return ["vqa"]
        out = ["caption"] if getattr(config, "has_decoder", True) else []
        return out + (["itm", "search"] if getattr(config, "has_itc", True) else [])

    def _require(self, task: str) -> None:
        if task not in self.tasks():
            name = getattr(getattr(self.predictor.model, "config", None), "name", "?")
            raise ApiError(400, f"model {name!r} does not do {task} (it does: "
                           f"{', '.join(self.tasks())})")  # fmt: skip

    def caption(self, image: bytes) -> str:
        """Decoded here, so a bad upload fails alone; captioned in a micro-batch."""
        from dlip.inference.predictor import DEFAULT_MAX_PIXELS, to_pil

        self._require("caption")
        pil = to_pil(image, getattr(self.predictor, "max_pixels", DEFAULT_MAX_PIXELS))
        return self.captioner(pil)

    def itm(self, image: bytes, text: str) -> float:
        self._require("itm")
        scores = self.locked(lambda: self.predictor.itm_scores(image, [text]))  # (1,)
        return float(scores.reshape(-1)[0])

    def vqa(self, image: bytes, question: str) -> str:
        self._require("vqa")
        return self.locked(lambda: self.predictor.vqa(image, [question], self.answers)[0])

    def search(self, query: str, k: int, rerank: int | None) -> dict:
        """{"results": hits, "skipped": index files re-ranking could not read (left out)}."""
        self._require("search")
        if self.index is None:
            raise ApiError(404, "no image index loaded: start `dlip serve` with --index DIR")
        hits = self.locked(lambda: self.predictor.search(query, self.index, k=k, rerank=rerank))
        return {"results": self._rows(hits), "skipped": len(getattr(hits, "skipped", ()))}

    def _rows(self, hits: list) -> list[dict]:
        out = []
        for hit in hits:
            i = self.positions.get(str(hit.path))
            row = {"path": str(hit.path), "score": float(hit.score), "itc": float(hit.itc)}
            row["itm"] = None if hit.itm is None else float(hit.itm)
            row["thumb"] = None if i is None else f"/api/image/{i}"
            out.append(row)
        return out

    def thumbnail(self, i: int) -> bytes:
        """JPEG thumbnail of index entry i; never reads a path outside the index.

        Each image is decoded once however many requests ask for it at the same moment (they
        wait for the first one's result), the result (or its error) is cached until the file's
        size or mtime changes, and at most THUMB_DECODERS decodes run at once."""
        if self.index is None or not 0 <= i < len(self.index.paths):
            raise ApiError(404, f"no image {i} in the index")
        path = Path(self.index.path(i))
        with self._thumb_lock:
            gate = self._pending.setdefault(i, [threading.Lock(), 0])
            gate[1] += 1  # requests holding or waiting for this gate
        try:
            with gate[0]:  # one decode of image i at a time; the others then find it cached
                signature = _signature(path)
                result = self._cached(i, signature)
                if result is None:
                    result = self._decode(path)
                    self._store(i, signature, result)
        finally:
            with self._thumb_lock:
                gate[1] -= 1
                if gate[1] == 0:
                    del self._pending[i]
        if isinstance(result, ApiError):
            raise result
        return result

    def _cached(self, i: int, signature: tuple[int, int]) -> bytes | ApiError | None:
        with self._thumb_lock:
            entry = self._thumbs.get(i)
            if entry is None or entry[0] != signature:
                return None
            self._thumbs.move_to_end(i)
            return entry[1]

    def _store(self, i: int, signature: tuple[int, int], result: bytes | ApiError) -> None:
        with self._thumb_lock:
            self._thumbs[i] = (signature, result)
            self._thumbs.move_to_end(i)
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)

    def _decode(self, path: Path) -> bytes | ApiError:
        max_pixels = getattr(self.predictor, "max_pixels", None) or THUMB_MAX_PIXELS
        with self._decode_slots:
            try:
                return _make_thumbnail(path, min(max_pixels, THUMB_MAX_PIXELS))
            except ApiError as err:
                return err


def _signature(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of an index file, (-1, -1) when it is gone: a replaced file is re-made."""
    from dlip.data.members import stat

    try:
        st = stat(path)  # a tar shard's for its members
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def _make_thumbnail(path: Path, max_pixels: int) -> bytes:
    from PIL import Image

    from dlip.data.members import read_bytes

    try:
        with Image.open(io.BytesIO(read_bytes(path))) as im:  # a file or a tar shard's member
            if im.width * im.height > max_pixels:
                raise ApiError(404, f"image {path.name} is too large to show")
            im.draft("RGB", (THUMB_SIZE, THUMB_SIZE))  # JPEG: decode at a reduced scale
            rgb = im.convert("RGB")
            rgb.thumbnail((THUMB_SIZE, THUMB_SIZE))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ApiError(404, f"image {path.name} cannot be read: {err}") from None
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def page_html() -> str:
    return resources.files("dlip").joinpath("assets/web/index.html").read_text(encoding="utf-8")


async def _form_file(form: Any, name: str) -> bytes:
    from starlette.datastructures import UploadFile

    value = form.get(name)
    if value is None:
        raise ApiError(400, f"missing form field {name!r} (an image file upload)")
    if not isinstance(value, UploadFile):
        raise ApiError(400, f"form field {name!r} must be a file upload, not text")
    data = await value.read()
    if not data:
        raise ApiError(400, f"form field {name!r} is an empty file")
    return data


def _clean_text(value: Any, name: str) -> str:
    if value is None:
        raise ApiError(400, f"missing field {name!r} (text)")
    if not isinstance(value, str):
        raise ApiError(400, f"field {name!r} must be text, not a file")
    text = value.strip()
    if not text:
        raise ApiError(400, f"field {name!r} is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise ApiError(400, f"field {name!r} is longer than {MAX_TEXT_CHARS} characters")
    return text


def _int_param(
    value: str | None, name: str, default: int | None, low: int, high: int
) -> int | None:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ApiError(400, f"parameter {name!r} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise ApiError(400, f"parameter {name!r} must be in [{low}, {high}], got {number}")
    return number


async def _run_model(fn: Callable[[], T], what: str) -> T:
    """Run a model call in a worker thread; bad input (BadImage is a ValueError) -> 400."""
    from PIL import Image
    from starlette.concurrency import run_in_threadpool

    try:
        return await run_in_threadpool(fn)
    except (ValueError, OSError, Image.DecompressionBombError) as err:
        raise ApiError(400, f"{what}: {err}") from None


# an absolute path's folders (POSIX or Windows), up to its last component
_ABS_DIRS = re.compile(r"(?<![\w.~-])(?:/|[A-Za-z]:[\\/])(?:[^\s/\\'\"]+[/\\])+")


def public_message(message: str) -> str:
    """`message` with every absolute path cut to its file name: errors (an OSError's own text
    included) must not show a client where the server keeps its files."""
    return _ABS_DIRS.sub("", message)


def _install_error_handlers(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def api_error(_request: Any, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": public_message(exc.message)}, status_code=exc.status)

    async def too_large(_request: Any, _exc: UploadTooLarge) -> JSONResponse:
        message = f"upload too large: the limit is {app.state.max_upload_bytes} bytes"
        return JSONResponse({"error": message}, status_code=413, headers={"connection": "close"})

    async def http_error(_request: Any, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    async def invalid(_request: Any, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()]
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(UploadTooLarge, too_large)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)


def create_app(
    predictor: Any,
    index: Any | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    answers: list[str] | None = None,
    max_batch: int = 8,
    batch_wait_ms: float = 5.0,
) -> Any:
    """The FastAPI app serving `predictor` (and `index` for search, `answers` for VQA);
    concurrent captions run in micro-batches (`max_batch` 1: one at a time)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, Response

    service = Service(predictor, index, answers, max_batch, batch_wait_ms)
    app = FastAPI(title="dlip", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.max_upload_bytes = max_upload_bytes
    _install_error_handlers(app)
    html = page_html()

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(html)

    @app.get("/api/info")
    async def info() -> dict:
        config = getattr(predictor.model, "config", None)
        sizes = list(service.captioner.sizes)
        return {
            "model": getattr(config, "name", None),
            "image_size": getattr(getattr(config, "vision", None), "image_size", None),
            "index_size": None if index is None else len(index.paths),
            "max_upload_bytes": max_upload_bytes,
            "tasks": service.tasks(),
            "vqa_answers": None if answers is None else len(answers),
            "caption_batching": {
                "max_batch": max_batch,
                "wait_ms": batch_wait_ms,
                "batches": len(sizes),
                "largest": max(sizes, default=0),
                "captions": sum(sizes),
            },
        }

    @app.post("/api/caption")
    async def caption(request: Request) -> dict:
        image = await _form_file(await request.form(), "image")
        return {"caption": await _run_model(lambda: service.caption(image), "field 'image'")}

    @app.post("/api/itm")
    async def itm(request: Request) -> dict:
        form = await request.form()
        image = await _form_file(form, "image")
        text = _clean_text(form.get("text"), "text")
        return {"score": await _run_model(lambda: service.itm(image, text), "field 'image'")}

    @app.post("/api/vqa")
    async def vqa(request: Request) -> dict:
        form = await request.form()
        image = await _form_file(form, "image")
        question = _clean_text(form.get("question"), "question")
        return {"answer": await _run_model(lambda: service.vqa(image, question), "field 'image'")}

    @app.get("/api/search")
    async def search(request: Request) -> dict:
        params = request.query_params
        query = _clean_text(params.get("q"), "q")
        k = _int_param(params.get("k"), "k", 10, 1, MAX_K)
        rerank = _int_param(params.get("rerank"), "rerank", None, 0, MAX_K) or None
        return await _run_model(lambda: service.search(query, k, rerank), "search")

    @app.get("/api/image/{i}")
    async def image(i: int) -> Response:
        from starlette.concurrency import run_in_threadpool

        data = await run_in_threadpool(service.thumbnail, i)
        return Response(data, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)
    return app


def serve(
    model: str,
    index: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    dtype: str = "float32",
    quantize: str | None = None,
    max_batch: int = 8,
    batch_wait_ms: float = 5.0,
    max_upload_mb: float = 20.0,
    log_level: str = "info",
    answers: str | None = None,
) -> None:
    """Load `model` (and `index`, and the VQA `answers` list), then serve the app until
    interrupted (`dlip serve`)."""
    import uvicorn

    from dlip.inference.index import ImageIndex
    from dlip.inference.predictor import Predictor

    if max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    answer_list = None
    if answers:
        from dlip.eval.vqa_eval import read_answer_list

        answer_list = read_answer_list(answers)
    predictor = Predictor.load(model, device=device, dtype=dtype, quantize=quantize)
    image_index = ImageIndex.load(index) if index else None
    if image_index is not None:
        image_index.check_model(predictor)  # fail at startup, not on the first search
    if answer_list is not None and not predictor.model.config.vqa:
        raise ValueError(f"--answers is for a VQA model; {model} is not one")
    limit = int(max_upload_mb * 1024 * 1024)
    if max_batch < 1 or batch_wait_ms < 0:
        raise ValueError(f"--max-batch >= 1, --batch-wait-ms >= 0 ({max_batch}, {batch_wait_ms})")
    app = create_app(predictor, image_index, limit, answer_list, max_batch, batch_wait_ms)
    print(f"dlip serve: http://{host}:{port}/ (model {model})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
