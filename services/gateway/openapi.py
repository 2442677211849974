"""The OpenAPI document under `/schema` (`/schema/openapi.json`): it states what the server enforces.

A client, or a fuzzer (schemathesis, in tests/integration/test_gateway_schema.py), that builds
requests from this document must be answered as the document says: a body valid by it is served
(or meets a rule across fields that JSON Schema cannot say, stated in the body's description), a
body invalid by it is a 400. So the document is assembled from the sources of truth rather than
written by hand:

- every body's schema is msgspec's JSON Schema of the very struct Litestar decodes it with
  (`openai_types`), so ranges, lengths, required and unknown fields are exactly what decoding
  checks; Litestar's own rendering of the structs drops some of them (bounds of 0, `gt`, the
  constraints of a union's members, `additionalProperties: false`);
- checks made in code are declared beside the fields as schema-only keywords, and values that
  depend on the served model (`openai_types.PER_MODEL` markers) are filled in here: the model's
  name, its vocabulary and context length;
- rules about a whole struct that no field can carry, or that msgspec's schema of a field
  states too widely, are set here (`_STRUCT_RULES`);
- each route's error statuses, with OpenAI's error body, the headers that come with them, the
  event stream a `stream: true` request is answered with, and the API key when keys are configured.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec
from litestar import Request
from litestar.openapi.plugins import JsonRenderPlugin

from services.gateway import openai_types as oa

TYPES: tuple[type[msgspec.Struct], ...] = (
    oa.CompletionRequest,
    oa.ChatCompletionRequest,
    oa.TokenizeRequest,
    oa.DetokenizeRequest,
    oa.CompletionResponse,
    oa.ChatCompletionResponse,
    oa.ChatCompletionChunk,
    oa.ModelList,
    oa.TokenizeResponse,
    oa.DetokenizeResponse,
    oa.VersionResponse,
    oa.ErrorBody,
)
_REF = "#/components/schemas/{name}"
MAX_TOKEN_KEY_LENGTH = 10  # prompts.PromptBuilder._logit_bias: a key of more digits is refused

_STRUCT_RULES: dict[str, dict[str, Any]] = {
    "CompletionRequest": {"properties": {"prompt": oa.PROMPT_SCHEMA}},
    # prompts.chat_prompt: a part must be text, with its text.
    "ContentPart": {"required": ["type", "text"], "properties": {"text": {"type": "string"}}},
    # tokenizer_routes.tokenize: exactly one of the two.
    "TokenizeRequest": {
        "oneOf": [
            {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}},
            {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}},
        ]
    },
}

_ERRORS = {
    400: "An invalid request; `error.param` names the field",
    401: "A missing or wrong API key (`Authorization: Bearer <key>`)",
    404: "Another model than the one served",
    413: f"A body over {oa.MAX_BODY_BYTES} bytes",
    429: "The cluster, or this gateway, is full: retry after `Retry-After` seconds",
    500: "An error of the gateway itself",
    502: "The backend failed the request",
    503: "No scheduler is reachable",
    504: "The backend stopped sending tokens",
}
_GENERATE = (400, 404, 413, 429, 500, 502, 503, 504)
_ROUTE_ERRORS: dict[str, tuple[int, ...]] = {
    "/v1/completions": _GENERATE,
    "/v1/chat/completions": _GENERATE,
    "/tokenize": (400, 404, 413, 500),
    "/detokenize": (400, 404, 413, 500),
    "/v1/models": (500,),
    "/version": (500,),
}
GUARDED = frozenset(_ROUTE_ERRORS)  # with API keys configured every route in the document needs one
_STREAMED = {"/v1/completions": "CompletionResponse", "/v1/chat/completions": "ChatCompletionChunk"}
_REQUEST_ID = {"description": "The request's id, as in the body", "required": True, "schema": {"type": "string"}}
_RETRY_AFTER = {"description": "Seconds to wait", "required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}}


def digits_below(limit: int) -> str:
    """A pattern for the decimal strings (ASCII digits, leading zeros allowed) of the integers in [0, limit).

    `logit_bias` keys are token ids written as strings; JSON Schema has no numeric bound on a
    property name, so the bound is spelled out digit by digit."""
    top = str(limit - 1)
    width = len(top)
    choices = [f"[1-9][0-9]{{0,{width - 2}}}"] if width > 1 else []
    for i, digit in enumerate(top):
        low = 1 if i == 0 else 0
        if int(digit) > low:  # this prefix, a smaller digit here, anything after
            choices.append(f"{top[:i]}[{low}-{int(digit) - 1}][0-9]{{{width - i - 1}}}")
    choices.append(top)
    return f"^0*(?:{'|'.join(choices)})?$"


def _fill_per_model(node: Any, model: str, vocab_size: int, max_model_len: int) -> None:
    """Replace every `PER_MODEL` marker with the served model's value."""
    if isinstance(node, list):
        for item in node:
            _fill_per_model(item, model, vocab_size, max_model_len)
        return
    if not isinstance(node, dict):
        return
    kind = node.pop(oa.PER_MODEL, None)
    if kind == "model":
        node["enum"] = [model, None]
    elif kind == "token_id":
        node["maximum"] = vocab_size - 1
    elif kind == "token_key":
        node["propertyNames"] = {"pattern": digits_below(vocab_size), "minLength": 1, "maxLength": MAX_TOKEN_KEY_LENGTH}
    elif kind == "context":
        node["maximum"] = max_model_len - 1
    elif kind == "prompt_tokens":
        node["maxItems"] = max_model_len - 1
    elif kind is not None:
        raise ValueError(f"unknown {oa.PER_MODEL} marker {kind!r}")
    for value in node.values():
        _fill_per_model(value, model, vocab_size, max_model_len)


def _merge(schema: dict[str, Any], rules: dict[str, Any]) -> None:
    for key, value in rules.items():
        if key == "properties":
            schema.setdefault("properties", {}).update(value)
        elif key == "required":
            schema["required"] = sorted({*schema.get("required", ()), *value})
        else:
            schema[key] = value


def _error(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _ERRORS[status],
        "content": {"application/json": {"schema": {"$ref": _REF.format(name="ErrorBody")}}},
    }
    if status == 429:
        response["headers"] = {"Retry-After": _RETRY_AFTER}
    return response


def _events(chunk: str) -> dict[str, Any]:
    """One server-sent event of a stream: a chunk, an error (once the stream has started), or `[DONE]`."""
    payload = {"anyOf": [{"$ref": _REF.format(name=chunk)}, {"$ref": _REF.format(name="ErrorBody")}]}
    data = {
        "type": "string",
        "if": {"const": "[DONE]"},
        "else": {"contentMediaType": "application/json", "contentSchema": payload},
    }
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def build_document(
    litestar_document: dict[str, Any], *, model: str, vocab_size: int, max_model_len: int, api_keys: bool
) -> dict[str, Any]:
    """The served document: Litestar's paths and operations, with the schemas and responses above."""
    document = copy.deepcopy(litestar_document)
    _, schemas = msgspec.json.schema_components(TYPES, ref_template=_REF)
    schemas = copy.deepcopy(schemas)  # they share dicts with openai_types' constants, which stay as they are
    for name, rules in _STRUCT_RULES.items():
        _merge(schemas[name], copy.deepcopy(rules))
    _fill_per_model(schemas, model, vocab_size, max_model_len)
    components = document.setdefault("components", {})
    components["schemas"] = schemas
    if api_keys:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, item in document.get("paths", {}).items():
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            for status in [s for s in responses if s != "200"]:
                del responses[status]  # Litestar's own 400 body is not the one the gateway answers with
            statuses = [*_ROUTE_ERRORS.get(path, (500,)), *((401,) if api_keys and path in GUARDED else ())]
            responses.update({str(status): _error(status) for status in sorted(statuses)})
            if path in _STREAMED:
                responses["200"].setdefault("headers", {})["X-Request-Id"] = _REQUEST_ID
                responses["200"]["content"]["text/event-stream"] = {"schema": _events(_STREAMED[path])}
            if api_keys and path in GUARDED:
                operation["security"] = [{"bearer": []}]
    return document


class DocumentPlugin(JsonRenderPlugin):
    """Serves `build_document`'s result (made once, on the first request) as `/schema` and `/schema/openapi.json`."""

    def __init__(self, *, model: str, vocab_size: int, max_model_len: int, api_keys: bool) -> None:
        super().__init__(path=["/", "/openapi.json"])
        self.model, self.vocab_size, self.max_model_len, self.api_keys = model, vocab_size, max_model_len, api_keys
        self.rendered: bytes | None = None

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        if self.rendered is None:
            document = build_document(
                openapi_schema,
                model=self.model,
                vocab_size=self.vocab_size,
                max_model_len=self.max_model_len,
                api_keys=self.api_keys,
            )
            self.rendered = self.render_json(request, document)
        return self.rendered
