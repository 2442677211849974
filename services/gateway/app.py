"""The gateway's HTTP application: OpenAI-compatible routes over the cluster's NATS control plane.

`create_app(settings)` loads the tokenizer and the context length from the model folder (the
gateway tokenizes, so the backend only ever sees token ids) and returns a Litestar app that
connects to NATS on start-up. Routes:

    POST /v1/completions, POST /v1/chat/completions   generate, as JSON or server-sent events
    GET  /v1/models                                    the one served model
    GET  /health                                       readiness: 200 while a request can be served, else 503
    GET  /live                                         liveness: 200 while the process answers
    POST /tokenize, POST /detokenize, GET /version     vLLM's utilities (services/gateway/tokenizer_routes.py)
    GET  /metrics                                      Prometheus text
    GET  /schema, /schema/openapi.json                 the OpenAPI document (services/gateway/openapi.py)
"""

from __future__ import annotations

import hmac
import re
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import SerializationException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.types import Guard
from prometheus_client import CONTENT_TYPE_LATEST
from transformers import AutoTokenizer

from common.errors import ModelLoadError
from common.model.spec import ModelSpec
from services.gateway import openai_types as oa
from services.gateway.backend import BackendClient
from services.gateway.errors import EXCEPTION_HANDLERS, APIError, invalid
from services.gateway.metrics import GatewayMetrics
from services.gateway.openapi import DocumentPlugin
from services.gateway.prompts import PromptBuilder, refuse_unsupported, stop_strings
from services.gateway.responses import Choice, fan_out
from services.gateway.serving import Job, Server
from services.gateway.settings import GatewaySettings
from services.gateway.tokenizer_routes import detokenize, server_version, tokenize

# The error statuses, the event stream and the API key are added to the document in openapi.py.
_GENERATE_DOC = "With `stream: true`, server-sent events (`data: <chunk>` ... `data: [DONE]`) in OpenAI's format."


@post(
    "/completions",
    status_code=200,
    description=_GENERATE_DOC,
    responses={
        200: ResponseSpec(oa.CompletionResponse, description="The completion (or, streamed, its chunks)"),
    },
)
async def completions(request: Request[Any, Any, Any], data: oa.CompletionRequest) -> Response[Any]:
    server, prompts = _server(request), PromptBuilder.of(request)
    prompts.check_model(data.model)
    refuse_unsupported(data)
    n = data.n or 1
    batch = prompts.completion_prompts(data)
    _check_choices(n, len(batch))
    choices = []
    for i, prompt in enumerate(batch):
        sampling = prompts.sampling(data, len(prompt.token_ids), data.max_tokens, data.logprobs)
        echo = "" if not data.echo else prompt.text if prompt.text is not None else _decode(prompts, prompt.token_ids)
        choices += fan_out(i, n, prompt.token_ids, sampling, echo)
    return await server.serve(request, _job(data, False, prompts.served_model_name, choices))


@post(
    "/chat/completions",
    status_code=200,
    description=_GENERATE_DOC,
    responses={
        200: ResponseSpec(oa.ChatCompletionResponse, description="The reply (or, streamed, its chunks)"),
    },
)
async def chat_completions(request: Request[Any, Any, Any], data: oa.ChatCompletionRequest) -> Response[Any]:
    server, prompts = _server(request), PromptBuilder.of(request)
    prompts.check_model(data.model)
    refuse_unsupported(data)
    if data.top_logprobs is not None and not data.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    logprobs = (data.top_logprobs or 0) if data.logprobs else None
    n = data.n or 1
    _check_choices(n, 1)
    prompt = prompts.chat_prompt(
        data.messages,
        add_generation_prompt=data.add_generation_prompt is not False,
        continue_final_message=bool(data.continue_final_message),
    )
    max_tokens = data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens
    try:
        sampling = prompts.sampling(data, len(prompt), max_tokens, logprobs)
    except APIError as exc:  # name the field as this endpoint's client sent it
        if exc.param == "logprobs":
            exc.param = "top_logprobs"
        elif exc.param == "max_tokens" and data.max_completion_tokens is not None:
            exc.param = "max_completion_tokens"
        raise
    choices = fan_out(0, n, prompt, sampling)
    return await server.serve(request, _job(data, True, prompts.served_model_name, choices))


def _check_choices(n: int, prompts: int) -> None:
    if n * prompts > oa.MAX_CHOICES:
        raise invalid(
            "n" if n > 1 else "prompt",
            f"{prompts} prompt(s) x n={n} make {n * prompts} choices; at most {oa.MAX_CHOICES} per request",
        )


def _decode(prompts: PromptBuilder, token_ids: list[int]) -> str:
    text: str = prompts.tokenizer.decode(token_ids)
    return text


def _job(data: oa.SamplingFields, chat: bool, model: str, choices: list[Choice]) -> Job:
    include_usage = bool(data.stream_options and data.stream_options.include_usage)
    return Job(
        chat,
        model,
        choices,
        stop_strings(data.stop),
        bool(data.stream),
        include_usage,
        include_stop=bool(data.include_stop_str_in_output),
        skip_special_tokens=data.skip_special_tokens is not False,
    )


@get("/models")
async def models(request: Request[Any, Any, Any]) -> oa.ModelList:
    prompts = PromptBuilder.of(request)
    card = oa.ModelCard(prompts.served_model_name, oa.now(), prompts.max_model_len)
    return oa.ModelList([card])


@get("/health", include_in_schema=False)
async def health(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """Readiness: 200 only while a request can be served (NATS, the scheduler, a prefill and a
    decode instance), else 503 naming what is missing, so a load balancer sends nothing here."""
    missing = await _server(request).backend.missing()
    if not missing:
        return Response({"status": "ok"})
    return Response({"status": "unavailable", "missing": missing}, status_code=503)


@get("/live", include_in_schema=False)
async def live() -> Response[dict[str, str]]:
    """Liveness: the process answers. A cluster that cannot serve is no reason to restart the gateway."""
    return Response({"status": "ok"})


@get("/metrics", include_in_schema=False)
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    return Response(_server(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


# The app's objects live in its state rather than in globals, so one process can hold several apps.
def _server(request: Request[Any, Any, Any]) -> Server:
    server: Server = request.app.state.server
    return server


_AT_PATH = re.compile(r"`\$\.(.+)`$")  # where msgspec's message says the error is, as Litestar reads it


class GatewayRequest(Request[Any, Any, Any]):
    """Litestar's request, except that a JSON body msgspec cannot decode is always a 400 that says why,
    and that a body is held to its JSON types strictly.

    msgspec decodes an untyped body recursively, so `[[[[...` thousands deep raises RecursionError,
    which would otherwise be a 500; Litestar's own message for bad bytes does not say it is the body.
    Litestar converts the decoded body to the handler's type with `strict=False`, which takes `"3"`
    for an integer, `"true"` or `1` for a boolean: JSON the OpenAI API (and the OpenAPI document)
    says is invalid, and that would mean what the client did not write (`"store": 0` passed as
    `false`). So the body is first converted strictly, and an error is reported as Litestar reports
    its own (`errors.on_validation_error` names the field). A number with no fraction is an integer
    in JSON Schema (`1.0` is one) and so here, where strict msgspec would refuse it.
    """

    async def json(self) -> Any:
        data = self.route_handler.parsed_data_field
        try:
            body = _integral_floats_as_ints(await super().json())
            if data is not None:
                msgspec.convert(body, data.annotation, strict=True)
        except RecursionError:  # in decoding, or in walking what was decoded
            raise invalid(None, "the request body nests JSON arrays or objects too deeply") from None
        except SerializationException as exc:
            raise invalid(None, f"the request body is not valid JSON: {exc}") from None
        except msgspec.ValidationError as exc:
            found = _AT_PATH.search(str(exc))
            error = {"message": str(exc).split(" - ", 1)[0], "key": found.group(1) if found else "data"}
            raise ValidationException(detail="the request body is invalid", extra=[error]) from None
        return body


def _integral_floats_as_ints(value: Any) -> Any:
    """`value` (decoded JSON) with every float that has no fraction made an int: where a float is
    expected msgspec takes the int as well, and where an int is, JSON Schema counts `3.0` as one."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral_floats_as_ints(item) for item in value]
    if isinstance(value, dict):
        return {key: _integral_floats_as_ints(item) for key, item in value.items()}
    return value


def _api_key_guard(keys: tuple[str, ...]) -> Guard:
    """Require `Authorization: Bearer <key>` with one of `keys` (compared in constant time)."""

    def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        scheme, _, given = connection.headers.get("authorization", "").partition(" ")
        token = given.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token, k.encode()) for k in keys):
            raise APIError(
                401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.", code="invalid_api_key"
            )

    return guard


def create_app(settings: GatewaySettings) -> Litestar:
    spec = ModelSpec.from_folder(settings.model)  # first: its error names a missing or unsupported folder clearly
    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.model, local_files_only=True)
    except Exception as exc:  # transformers raises many types for one cause: no usable tokenizer files
        raise ModelLoadError(f"{settings.model}: no tokenizer can be loaded: {exc}") from exc
    backend = BackendClient(settings)
    gateway_metrics = GatewayMetrics(settings.served_model_name)
    server = Server(backend, tokenizer, gateway_metrics)
    prompts = PromptBuilder(tokenizer, settings.served_model_name, spec.max_model_len, spec.vocab_size)
    guards = [_api_key_guard(settings.api_keys)] if settings.api_keys else []
    v1 = Router("/v1", route_handlers=[completions, chat_completions, models], guards=guards)
    # vLLM serves these at the root; with API keys configured they need one too, as /v1 does.
    utilities = Router("/", route_handlers=[tokenize, detokenize, server_version], guards=guards)
    return Litestar(
        route_handlers=[v1, utilities, health, live, metrics],
        state=State({"server": server, "prompts": prompts}),
        on_startup=[backend.start],
        on_shutdown=[backend.close],
        exception_handlers=EXCEPTION_HANDLERS,
        request_class=GatewayRequest,
        request_max_body_size=oa.MAX_BODY_BYTES,
        middleware=[gateway_metrics.middleware],
        openapi_config=OpenAPIConfig(
            title="Adrenaline gateway",
            version="1",
            description="OpenAI-compatible API",
            render_plugins=[
                DocumentPlugin(
                    model=settings.served_model_name,
                    vocab_size=spec.vocab_size,
                    max_model_len=spec.max_model_len,
                    api_keys=bool(settings.api_keys),
                )
            ],
        ),
        logging_config=None,  # structlog writes our lines; Litestar must not reconfigure the root logger
    )
