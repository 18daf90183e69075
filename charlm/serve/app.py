"""The HTTP API and the page, as a Starlette app: JSON in, JSON or server-sent events out.

    GET  /                         the playground page (and /playground.js, /playground.css)
    GET  /api/models               the models on offer, newest first, with their figures
    POST /api/sample               {model, seed, length, temperature, top_k, top_p, rng_seed}
                                   -> text/event-stream: `start`, `chars` ... , then `done` (or `error`)
    POST /api/score                {model, text} -> figures and each character's bits and top guesses
    GET  /api/runs                 the training runs whose metrics logs are on offer
    GET  /api/runs/{name}/metrics  one run's learning curves

Safe by default: a model is named from the server's own list, never by a path, and no request makes
the server read or write a file it was not started with; POST bodies must be JSON (so a page on
another site cannot post a form here without a CORS preflight, which is refused); every input has a
limit with a 4xx answer that says which; on a loopback address only Host headers naming loopback are
accepted (DNS rebinding). The page's Content-Security-Policy allows its own script and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import CharlmError
from ..surprise import BAND_COLORS, BANDS, UNKNOWN_COLOR
from .models import Models, UnknownName
from .pool import PoolFull, Request

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class LoopbackHostOnly:
    """Refuses requests whose Host header names anything but loopback: a page on another site that
    points its own domain name at 127.0.0.1 (DNS rebinding) cannot reach a server bound there."""

    def __init__(self, app) -> None:  # noqa: ANN001 - an ASGI app
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0] if ":" in host else host
            if name.lower() not in LOOPBACK_HOSTS:
                await _error(400, "this server answers only to 127.0.0.1 and localhost")(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (`charlm serve --max-*`, `--timeout`)."""

    max_length: int = 2000  # characters one generation may write
    max_body: int = 1 << 20  # bytes of a request body
    max_score_chars: int = 100_000  # characters of a text to score
    max_generations: int = 32  # running at once, over all models; more get 429
    timeout_s: float = 120.0  # a generation's whole time; a score's wait for a free scorer
    max_scores: int = 2  # texts scored at once; more wait (up to timeout_s), then 503


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def api_message(error: CharlmError) -> str:
    """A library error in the API's words: CLI option names become the JSON fields they match."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), str(error))


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={**SECURITY_HEADERS, **headers})


async def read_json(request: HttpRequest, limit: int) -> dict:
    """The body as a JSON object, read no further than `limit` bytes."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "send the body as JSON with Content-Type: application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over the server's limit of {limit:,} bytes (--max-body)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the server's limit of {limit:,} bytes (--max-body)")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def _field(data: dict, name: str, kind: type | tuple[type, ...], default: object) -> object:
    value = data.get(name, default)
    if value is None or value is default:
        return value
    if isinstance(value, bool) or not isinstance(value, kind):
        wanted = "a number" if kind in (float, (int, float)) else "an integer" if kind is int else "a string"
        raise ApiError(400, f"'{name}' must be {wanted}")
    return value


def sample_request(data: dict, limits: Limits) -> Request:
    known = {"model", "seed", "length", "temperature", "top_k", "top_p", "rng_seed", "stop", "lines", "include_stop"}
    extra = sorted(set(data) - known)
    if extra:
        raise ApiError(400, f"unknown field {extra[0]!r}; the fields are {', '.join(sorted(known))}")
    length = _field(data, "length", int, 500)
    if isinstance(length, int) and length > limits.max_length:
        raise ApiError(400, f"length {length:,} is over the server's limit of {limits.max_length:,} (--max-length)")
    temperature = _field(data, "temperature", (int, float), 1.0)
    top_p = _field(data, "top_p", (int, float), None)
    stop = _field(data, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 8 or any(not isinstance(s, str) or len(s) > 100 for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 8 strings of up to 100 characters")
    include_stop = data.get("include_stop", False)
    if not isinstance(include_stop, bool):
        raise ApiError(400, "'include_stop' must be true or false")
    return Request(
        seed=_field(data, "seed", str, ""),
        length=length,
        temperature=float(temperature),
        top_k=_field(data, "top_k", int, None),
        top_p=None if top_p is None else float(top_p),
        rng_seed=_field(data, "rng_seed", int, None),
        stop=tuple(stop),
        lines=_field(data, "lines", int, None),
        include_stop=include_stop,
    )


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def score_json(name: str, score) -> dict:  # noqa: ANN001 - surprise.TextScore
    """Figures and per-character bits (null where a character is not in the model's vocabulary),
    with the model's top guesses there as [character, probability] pairs, likeliest first."""
    m = score.metrics
    chars = score.vocab.chars
    bits = [None if math.isnan(b) else round(b, 3) for b in score.bits.tolist()]
    guesses = [
        [[chars[g], round(p, 4)] for g, p in zip(gs, ps, strict=True) if g >= 0]
        for gs, ps in zip(score.guesses.tolist(), score.guess_probs.tolist(), strict=True)
    ]
    return {
        "model": name,
        "chars": m.chars,
        "unknown": m.unknown,
        "unknown_chars": m.unknown_chars,
        "cross_entropy": _finite(m.cross_entropy),
        "perplexity": _finite(m.perplexity),
        "bpc": _finite(m.bpc),
        "text": score.text,
        "bits": bits,
        "guesses": guesses,
        "scale": {"bands": list(BANDS), "colors": [list(c) for c in BAND_COLORS], "unknown": list(UNKNOWN_COLOR)},
    }


def _asset(name: str) -> str:
    return resources.files("charlm.serve").joinpath(name).read_text(encoding="utf-8")


def create_app(models: Models, limits: Limits | None = None, *, loopback_only: bool = False) -> Starlette:
    """The app for `charlm serve`; tests drive it in-process."""
    limits = limits or Limits()
    pages = {
        "/": ("playground.html", "text/html; charset=utf-8"),
        "/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
        "/playground.css": ("playground.css", "text/css; charset=utf-8"),
        "/favicon.svg": ("favicon.svg", "image/svg+xml"),
    }
    assets = {path: (_asset(name), kind) for path, (name, kind) in pages.items()}
    scorers = asyncio.Semaphore(limits.max_scores)

    async def page(request: HttpRequest) -> Response:
        body, kind = assets[request.url.path]
        return Response(body, media_type=kind.split(";")[0], headers=SECURITY_HEADERS)

    async def list_models(request: HttpRequest) -> Response:
        offers = await run_in_threadpool(models.offers)
        return JSONResponse({"models": [o.to_json() for o in offers]}, headers=SECURITY_HEADERS)

    async def sample(request: HttpRequest) -> Response:
        data = await read_json(request, limits.max_body)
        req = sample_request(data, limits)
        name, lm, pool = await run_in_threadpool(models.get, data.get("model"))
        if models.active() >= limits.max_generations:
            raise PoolFull(
                f"all {limits.max_generations} generation slots are in use",
                "try again in a moment (the server was started with --max-generations)",
            )
        generation = pool.start(req, timeout_s=limits.timeout_s)

        async def events() -> AsyncIterator[bytes]:
            try:
                yield _sse("start", {"model": name, "seed": req.seed, "length": req.length, "rng_seed": req.rng_seed})
                while True:
                    event = await generation.queue.get()
                    if event.kind == "chars":
                        yield _sse("chars", {"text": event.text})
                    else:
                        yield _sse(event.kind, event.summary)
                        return
            finally:  # done, or the client went away (Starlette cancels this generator): free the row
                generation.cancel()

        stream = events()
        weakref.finalize(stream, generation.cancel)  # a client gone before the first byte: never iterated
        headers = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    async def score(request: HttpRequest) -> Response:
        data = await read_json(request, limits.max_body)
        extra = sorted(set(data) - {"model", "text"})
        if extra:
            raise ApiError(400, f"unknown field {extra[0]!r}; the fields are model, text")
        text = data.get("text")
        if not isinstance(text, str):
            raise ApiError(400, "'text' must be a string")
        if not text:
            raise ApiError(400, "'text' is empty: give the text to score")
        if len(text) > limits.max_score_chars:
            raise ApiError(
                413,
                f"the text has {len(text):,} characters, over the server's limit of "
                f"{limits.max_score_chars:,} (--max-score-chars)",
            )
        name, lm, _ = await run_in_threadpool(models.get, data.get("model"))
        try:
            await asyncio.wait_for(scorers.acquire(), timeout=limits.timeout_s)
        except TimeoutError:
            raise ApiError(503, "every scorer stayed busy for the whole --timeout; try again") from None
        try:
            result = await run_in_threadpool(lambda: score_json(name, lm.score(text)))
        finally:
            scorers.release()
        return JSONResponse(result, headers=SECURITY_HEADERS)

    async def runs(request: HttpRequest) -> Response:
        found = await run_in_threadpool(models.runs)
        now = time.time_ns()
        for run in found:
            run["updated_s_ago"] = round((now - run.pop("updated_ns")) / 1e9, 1)
        return JSONResponse({"runs": found}, headers=SECURITY_HEADERS)

    async def run_metrics(request: HttpRequest) -> Response:
        name = request.path_params["name"]
        curves = await run_in_threadpool(models.curves, name)
        return JSONResponse(
            {
                "name": name,
                "train_bpc": curves.train_bpc,
                "val_bpc": curves.val_bpc,
                "lr": curves.lr,
                "best_val_bpc": curves.best_val_bpc,
                "x": "characters seen",
            },
            headers=SECURITY_HEADERS,
        )

    async def on_api_error(request: HttpRequest, exc: Exception) -> Response:
        return _error(exc.status, exc.message)

    async def on_unknown(request: HttpRequest, exc: Exception) -> Response:
        return _error(404, api_message(exc))

    async def on_full(request: HttpRequest, exc: Exception) -> Response:
        return _error(429, api_message(exc), **{"Retry-After": "1"})

    async def on_user_error(request: HttpRequest, exc: Exception) -> Response:
        return _error(400, api_message(exc))

    async def on_http(request: HttpRequest, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        return _error(status, {404: "no such page", 405: "method not allowed"}.get(status, str(exc)))

    async def on_bug(request: HttpRequest, exc: Exception) -> Response:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    from starlette.exceptions import HTTPException

    routes = [Route(path, page) for path in pages] + [
        Route("/api/models", list_models),
        Route("/api/sample", sample, methods=["POST"]),
        Route("/api/score", score, methods=["POST"]),
        Route("/api/runs", runs),
        Route("/api/runs/{name}/metrics", run_metrics),
    ]
    middleware = [Middleware(LoopbackHostOnly)] if loopback_only else []
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            ApiError: on_api_error,
            UnknownName: on_unknown,
            PoolFull: on_full,
            CharlmError: on_user_error,
            HTTPException: on_http,
            Exception: on_bug,
        },
    )
    app.state.models = models
    app.state.limits = limits
    return app
