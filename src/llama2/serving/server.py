"""The OpenAI-compatible HTTP server: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`, and
the web chat page at `/`.

Handlers only parse, encode and format; all generation runs in the `Engine`'s worker thread, which batches
concurrent requests. Chat prompts are built by `encode_dialog`, the one home of the Llama 2 chat format.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from llama2.generation.llama import Llama
from llama2.serving import openai_format as fmt
from llama2.serving.bridge import Job, Submission
from llama2.serving.engine import Engine, Finished, SamplingParams, TextDelta
from llama2.serving.errors import APIError, invalid
from llama2.serving.protocol import Sampling, parse_chat, parse_completion
from llama2.tokenizer.chat_format import UNSAFE_ERROR, DialogError, encode_dialog

STATIC = Path(__file__).parent / "static"


@dataclass
class ServerState:
    llm: Llama
    engine: Engine
    model_name: str
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(llm: Llama, model_name: str, api_key: str | None = None, max_batch_size: int = 16,
               prefix_cache_tokens: int | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the batching worker. `prefix_cache_tokens`: positions of
    finished requests kept for later prompts that start the same way (`serving.prefix_store`; default twice
    the model's context, 0 for none)."""
    if prefix_cache_tokens is None:
        prefix_cache_tokens = 2 * llm.args.max_seq_len
    engine = Engine(llm.model, llm.tokenizer, max_batch_size, prefix_cache_tokens=prefix_cache_tokens)
    state = ServerState(llm, engine, model_name, api_key)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        state.engine.shutdown()

    app = FastAPI(title="llama2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = state
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    app.include_router(_api_router(state))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health() -> dict:
        engine = state.engine
        return {"status": "ok", "model": state.model_name, "running": engine.running, "waiting": engine.waiting,
                "prompt_tokens": engine.prompt_tokens, "reused_prompt_tokens": engine.reused_tokens,
                "prefix_cache": {"entries": len(engine.prefix_store), "tokens": engine.prefix_store.tokens,
                                 "max_tokens": engine.prefix_store.max_tokens}}

    return app


# --- errors -------------------------------------------------------------------------------------------------


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    """Unknown paths (404) and wrong methods (405) in the OpenAI error shape too."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(APIError(exc.status_code, str(exc.detail), None, code).body(), status_code=exc.status_code)


async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    error = APIError(500, f"internal error: {type(exc).__name__}: {exc}", None, None, "server_error")
    return JSONResponse(error.body(), status_code=500)


# --- the API ------------------------------------------------------------------------------------------------


def _api_router(state: ServerState) -> APIRouter:
    async def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")

    router = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])
    max_n = state.engine.max_batch_size

    @router.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(state)]}

    @router.get("/models/{model_id}")
    async def model(model_id: str) -> dict:
        if model_id != state.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server has {state.model_name!r}",
                           "model", "model_not_found")
        return _model_card(state)

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        req = parse_chat(await _json_body(request), max_n)
        prompt = _encode_chat(state, req.messages)
        params = _generation_params(state, len(prompt), req.sampling, "messages")
        jobs = [Job(prompt, p) for p in _per_choice(params, req.sampling.n)]
        return await _respond(state, fmt.ReplyMeta("chat", state.model_name), jobs, req.sampling, len(prompt))

    @router.post("/completions")
    async def completions(request: Request):
        req = parse_completion(await _json_body(request), max_n)
        tokenizer = state.llm.tokenizer
        prompts = [tokenizer.encode(p, bos=True, eos=False) for p in req.prompts]
        jobs = []
        for ids in prompts:
            params = _generation_params(state, len(ids), req.sampling, "prompt")
            jobs += [Job(ids, p) for p in _per_choice(params, req.sampling.n)]
        meta = fmt.ReplyMeta("text", state.model_name)
        return await _respond(state, meta, jobs, req.sampling, sum(map(len, prompts)))

    return router


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "llama2",
            "max_model_len": state.llm.args.max_seq_len}


async def _json_body(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", None, "invalid_json") from exc


def _encode_chat(state: ServerState, messages: list[dict[str, str]]) -> list[int]:
    try:
        return encode_dialog(state.llm.tokenizer, messages)
    except DialogError as exc:
        code = "special_tags_not_allowed" if str(exc) == UNSAFE_ERROR else "invalid_dialog"
        raise invalid(str(exc), "messages", code) from exc


def _generation_params(state: ServerState, prompt_len: int, sampling: Sampling, prompt_param: str) -> SamplingParams:
    """Check the prompt and `max_tokens` against the context; no `max_tokens` means up to the context's end."""
    context = state.llm.args.max_seq_len
    room = context - prompt_len
    if room < 1:
        raise invalid(f"this model's maximum context length is {context} tokens, but the prompt has {prompt_len}",
                      prompt_param, "context_length_exceeded")
    if sampling.max_tokens is not None and sampling.max_tokens > room:
        raise invalid(
            f"this model's maximum context length is {context} tokens; you asked for {prompt_len + sampling.max_tokens}"
            f" ({prompt_len} in the prompt, {sampling.max_tokens} for the completion)",
            "max_tokens", "context_length_exceeded",
        )
    return SamplingParams(sampling.max_tokens or room, sampling.temperature, sampling.top_p, sampling.stop,
                          sampling.seed)


def _per_choice(params: SamplingParams, n: int) -> list[SamplingParams]:
    """Choice i samples with seed + i, so `n` seeded choices differ from each other but repeat across calls."""
    if params.seed is None:
        return [params] * n
    return [SamplingParams(params.max_tokens, params.temperature, params.top_p, params.stop, params.seed + i)
            for i in range(n)]


async def _respond(state: ServerState, meta: fmt.ReplyMeta, jobs: list[Job], sampling: Sampling, prompt_tokens: int):
    submission = Submission(state.engine, jobs)
    if sampling.stream:
        stream = _stream(meta, submission, len(jobs), prompt_tokens, sampling.include_usage)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    outcomes = await submission.collect()
    failed = next((o.finished for o in outcomes if o.finished.reason == "error"), None)
    if failed is not None:
        raise APIError(500, failed.error or "generation failed", None, None, "server_error")
    finished = [o.finished for o in outcomes]
    body = fmt.reply(meta, ["".join(o.text) for o in outcomes], [f.reason for f in finished],
                     fmt.usage(prompt_tokens, finished))
    return JSONResponse(body)


async def _stream(meta: fmt.ReplyMeta, submission: Submission, choices: int, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    if meta.kind == "chat":
        for i in range(choices):
            yield fmt.sse(fmt.chunk(meta, i, role=True))
    finished: list[Finished] = []
    async for index, event in submission.events():
        if isinstance(event, TextDelta):
            yield fmt.sse(fmt.chunk(meta, index, text=event.text))
        elif event.reason == "error":
            yield fmt.sse(APIError(500, event.error or "generation failed", None, None, "server_error").body())
            return
        else:
            finished.append(event)
            yield fmt.sse(fmt.chunk(meta, index, reason=event.reason))
    if include_usage:
        yield fmt.sse(fmt.usage_chunk(meta, fmt.usage(prompt_tokens, finished)))
    yield fmt.sse("[DONE]")
