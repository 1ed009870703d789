"""HTTP API beside the touchscreen UI: score a frame, health, Prometheus metrics.

Every bad request gets a 4xx with a message that says what to fix; nothing a client
sends can stop the inspection loop.
"""
from __future__ import annotations

import json
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from python_multipart.multipart import parse_options_header

from appliance import metrics
from models.errors import BadExplanation, BadFrame, LinejudgeError
from models.preprocess import MAX_EXPLANATION_CHARS, decode_image_bytes

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_REQUEST_BYTES = MAX_IMAGE_BYTES + 64 * MAX_EXPLANATION_CHARS     # the frame plus form fields
MAX_CANDIDATES = 256
TOO_LARGE = f"request too large; frames up to {MAX_IMAGE_BYTES // 2**20} MB"


class RequestTooLarge(BadFrame):
    """The request body passed the size limit (answered with 413)."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _parse_candidates(raw) -> list[str]:
    if raw in (None, "", []):
        return []
    if isinstance(raw, (bytes, str)):
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadExplanation("candidates must be a JSON list of strings") from None
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise BadExplanation("candidates must be a JSON list of strings")
    if len(raw) > MAX_CANDIDATES:
        raise BadExplanation(f"at most {MAX_CANDIDATES} candidates per request")
    return raw


def _declared_length(request: Request) -> int:
    raw = request.headers.get("content-length") or "0"
    if not raw.strip().isdigit():
        raise BadFrame(f"the Content-Length header must be a number of bytes, not {raw[:40]!r}; "
                       "leave it to your HTTP client")
    return int(raw)


async def _read_body(request: Request) -> bytes:
    """The raw body, read as it arrives: a chunked upload without Content-Length stops at the limit."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_IMAGE_BYTES:
            raise RequestTooLarge(TOO_LARGE)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_request(request: Request) -> tuple[bytes, list[str], bool]:
    """multipart/form-data (image file + candidates JSON) or a raw image body. Text that is not
    valid UTF-8 (in the query string or a form's text fields) raises UnicodeDecodeError: it is
    refused, never decoded with replacement characters or as Latin-1."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        body = await _read_body(request)
        _check_form_text(body, ctype)
        form = await _replay(request, body).form(max_part_size=MAX_IMAGE_BYTES)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise BadFrame("send the frame as a file field named 'image'")
        if upload.size is not None and upload.size > MAX_IMAGE_BYTES:
            raise RequestTooLarge(TOO_LARGE)
        image = await upload.read()
        only = str(form.get("only_candidates", "false")).lower() in ("1", "true", "yes")
        return image, _parse_candidates(form.get("candidates")), only
    if ctype.startswith("application/json"):
        raise BadFrame("send the frame as multipart/form-data (field 'image') or as a raw image/* body")
    query = _strict_query(request.scope.get("query_string", b""))
    body = await _read_body(request)
    return body, _parse_candidates(query.get("candidates", [None])[-1]), False


def _strict_query(raw: bytes) -> dict[str, list[str]]:
    """A query string or urlencoded body, percent-decoded as strict UTF-8."""
    return parse_qs(raw.decode("ascii"), keep_blank_values=True, errors="strict")


def _check_form_text(body: bytes, ctype: str) -> None:
    """Every text field (a part without a filename) of a multipart body, or every value of an
    urlencoded one, must be valid UTF-8; raises UnicodeDecodeError otherwise."""
    if ctype.startswith("application/x-www-form-urlencoded"):
        _strict_query(body)
        return
    boundary = parse_options_header(ctype)[1].get(b"boundary")
    if not boundary:
        return                              # the form parser refuses it
    for part in body.split(b"--" + boundary):
        head, separator, content = part.partition(b"\r\n\r\n")
        if separator and b"filename=" not in head.lower():
            content.removesuffix(b"\r\n").decode("utf-8")


def _replay(request: Request, body: bytes) -> Request:
    """The same request with its body, already read (and size-checked), offered again."""
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}
    return Request(request.scope, receive)


def create_api(appliance) -> FastAPI:
    app = FastAPI(title="linejudge appliance API", version="1")

    @app.exception_handler(LinejudgeError)
    async def _domain_error(_, exc: LinejudgeError):
        return _error(400, str(exc))

    @app.post("/v1/score")
    async def score(request: Request):
        if _declared_length(request) > MAX_REQUEST_BYTES:
            return _error(413, TOO_LARGE)
        try:
            image, candidates, only = await _read_request(request)
        except RequestTooLarge as exc:
            return _error(413, str(exc))
        except UnicodeDecodeError:
            return _error(400, "the request is not valid UTF-8")
        frame = decode_image_bytes(image)
        if only and not candidates:
            raise BadExplanation("only_candidates needs a non-empty candidates list")
        inspection_id, judgement = appliance.inspect(frame, candidates, only, source="api")
        d = judgement.decision
        return {"inspection_id": inspection_id, "verdict": d.verdict, "p_best": d.p_best,
                "flagged": d.flagged, "reasons": d.reasons, "model_version": judgement.model_version,
                "latency_ms": round(judgement.latency_ms, 2),
                "ranking": [{"text": t, "score": s} for t, s in d.ranking]}

    @app.get("/healthz")
    def healthz():
        age = appliance.seconds_since_progress()
        healthy = age < 30
        body = {"ok": healthy, "model_version": appliance.runtime.version,
                "provider": appliance.runtime.provider, "seconds_since_last_inspection": round(age, 1)}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics")
    def prometheus():
        return Response(metrics.render(appliance.store.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/status")
    def status():
        return appliance.status()

    @app.exception_handler(json.JSONDecodeError)
    async def _bad_json(_, exc):
        return PlainTextResponse(f"malformed JSON: {exc}", status_code=400)

    return app
