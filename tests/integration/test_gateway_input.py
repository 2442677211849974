"""The gateway's HTTP input handling: whatever a client sends, the answer is a 4xx in OpenAI's shape.

Bytes that are not JSON, JSON nested thousands deep, absurd numbers, too many or too long stop
strings, unknown chat roles and fields the server does not implement are each refused before
anything reaches the backend, with `error.param` naming the field where there is one; the
neutral values clients send for unimplemented fields still pass. Same harness as
gateway_harness.py (its module fixture, a separate instance for this module).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from services.gateway.openai_types import (
    MAX_BAD_WORD_LENGTH,
    MAX_BAD_WORDS,
    MAX_BODY_BYTES,
    MAX_CHOICES,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    MAX_TOP_K,
    NOT_SPACE,
)
from tests.integration.gateway_harness import API_KEY, MODEL, Env
from tests.integration.gateway_harness import env as env  # the module fixture, a fresh instance for this module

pytestmark = pytest.mark.timeout(60)
USER = [{"role": "user", "content": "x"}]


@pytest.fixture(scope="module")
def http(env: Env) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=env.url, headers=headers, timeout=20) as client:
        yield client


def _post(http: httpx.Client, path: str, body: bytes | dict[str, Any]) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(f"/v1/{path}", content=content)


def _refused(r: httpx.Response, status: int = 400) -> dict[str, Any]:
    """The OpenAI error of a refused request (asserting its status and shape)."""
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error" and error["message"], error
    return error


def _minimal(path: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The smallest valid body for `path`, with `fields` on top."""
    base: dict[str, Any] = {"prompt": "x"} if path == "completions" else {"messages": USER}
    return {"model": MODEL, **base, **fields}


def _refused_before_the_backend(
    env: Env, http: httpx.Client, path: str, body: bytes | dict[str, Any]
) -> dict[str, Any]:
    submits = len(env.backend.submits)
    error = _refused(_post(http, path, body))
    assert len(env.backend.submits) == submits, "a refused request reached the backend"
    return error


# ---- bytes and nesting -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("completions", b'{"model":"m","prompt":"\xff\xfe"}'),
        ("completions", b'{"model":"m","prompt":"ok \xc3\x28"}'),
        ("completions", b'{"model\xff":"m","prompt":"x"}'),
        ("completions", b'{"model":"m","prompt":"\\ud800"}'),  # a lone surrogate, escaped
        ("completions", b'{"model":"m","prompt":"x","stop":["\\udfff"]}'),
        ("chat/completions", b'{"model":"m","messages":[{"role":"user","content":"\xff"}]}'),
    ],
)
def test_invalid_utf8_is_400(env: Env, http: httpx.Client, path: str, body: bytes) -> None:
    error = _refused_before_the_backend(env, http, path, body)
    assert error["message"].startswith("the request body is not valid JSON"), error
    assert error["param"] is None


@pytest.mark.parametrize("body", [b"", b"null", b"[]", b"7", b'"prompt"'])
@pytest.mark.parametrize("path", ["completions", "chat/completions"])
def test_a_body_that_is_not_an_object_is_400(env: Env, http: httpx.Client, path: str, body: bytes) -> None:
    error = _refused_before_the_backend(env, http, path, body)
    assert error["param"] is None, error
    assert ("empty" if not body else "Expected `object`") in error["message"], error


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("completions", b'{"model":"m","prompt":' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("completions", b'{"model":"m","prompt":"x","logit_bias":' + b'{"a":' * 5000 + b"1" + b"}" * 5001),
        ("chat/completions", b'{"model":"m","messages":' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ],
)
def test_json_nested_thousands_deep_is_400(env: Env, http: httpx.Client, path: str, body: bytes) -> None:
    error = _refused_before_the_backend(env, http, path, body)
    assert "nests" in error["message"] and error["param"] is None, error


def test_a_prompt_nested_beyond_openais_forms_is_400_naming_it(env: Env, http: httpx.Client) -> None:
    error = _refused_before_the_backend(env, http, "completions", {"model": MODEL, "prompt": [[[1]]]})
    assert error["param"] == "prompt[0][0]", error


def test_a_body_over_the_limit_is_413_before_it_is_read(env: Env) -> None:
    """Only the headers are sent: the answer must come from the announced length alone (sending the
    body too would race the server closing the connection)."""
    url = httpx.URL(env.url)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {url.host}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((url.host, url.port or 80), timeout=20) as sock:
        sock.sendall(head.encode())
        received = b"".join(iter(lambda: sock.recv(65536), b""))  # until the server closes
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line.split()[1] == b"413", received
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", error


# ---- numbers -----------------------------------------------------------------------------------
HUGE = 10**23  # sent as a JSON integer: no int64 holds it


@pytest.mark.parametrize(
    ("path", "field", "value", "param"),
    [
        ("completions", "top_k", HUGE, "top_k"),
        ("completions", "top_k", 1e23, "top_k"),
        ("completions", "top_k", MAX_TOP_K + 1, "top_k"),
        ("completions", "top_k", -2, "top_k"),
        ("completions", "max_tokens", HUGE, "max_tokens"),
        ("completions", "max_tokens", 0, "max_tokens"),
        ("completions", "n", HUGE, "n"),
        ("completions", "best_of", HUGE, "best_of"),
        ("completions", "logprobs", HUGE, "logprobs"),
        ("completions", "logprobs", -1, "logprobs"),
        ("completions", "seed", HUGE, "seed"),
        ("completions", "seed", -1, "seed"),
        ("completions", "temperature", 1e30, "temperature"),
        ("completions", "temperature", -0.5, "temperature"),
        ("completions", "top_p", 1e30, "top_p"),
        ("chat/completions", "top_k", HUGE, "top_k"),
        ("chat/completions", "max_completion_tokens", HUGE, "max_completion_tokens"),
        ("chat/completions", "max_completion_tokens", 0, "max_completion_tokens"),
        ("chat/completions", "max_tokens", HUGE, "max_tokens"),
        ("chat/completions", "top_logprobs", HUGE, "top_logprobs"),
        ("chat/completions", "n", 0, "n"),
        ("completions", "n", MAX_CHOICES + 1, "n"),
        ("completions", "presence_penalty", 1e30, "presence_penalty"),
        ("completions", "repetition_penalty", 0, "repetition_penalty"),
        ("completions", "min_tokens", HUGE, "min_tokens"),
    ],
)
def test_absurd_numbers_are_400_naming_the_field(
    env: Env, http: httpx.Client, path: str, field: str, value: float, param: str
) -> None:
    base: dict[str, Any] = {"prompt": "x"} if path == "completions" else {"messages": USER, "logprobs": True}
    error = _refused_before_the_backend(env, http, path, {"model": MODEL, **base, field: value})
    assert error["param"] == param, error


# ---- stop strings ------------------------------------------------------------------------------
def test_stop_strings_up_to_the_limits_are_served(env: Env, http: httpx.Client) -> None:
    stop = [f"{i:02d}" + "~" * (MAX_STOP_LENGTH - 2) for i in range(MAX_STOP_STRINGS)]
    r = _post(http, "completions", {"model": MODEL, "prompt": "x", "max_tokens": 3, "stop": stop})
    assert r.status_code == 200, r.text
    r = _post(http, "chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 3, "stop": stop[0]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("stop", "param", "limit"),
    [
        (["s"] * (MAX_STOP_STRINGS + 1), "stop", MAX_STOP_STRINGS),
        ("s" * (MAX_STOP_LENGTH + 1), "stop", MAX_STOP_LENGTH),
        (["s", "s" * (MAX_STOP_LENGTH + 1)], "stop[1]", MAX_STOP_LENGTH),
    ],
)
def test_too_many_or_too_long_stop_strings_are_400(
    env: Env, http: httpx.Client, stop: Any, param: str, limit: int
) -> None:
    for path, base in (("completions", {"prompt": "x"}), ("chat/completions", {"messages": USER})):
        error = _refused_before_the_backend(env, http, path, {"model": MODEL, **base, "stop": stop})
        assert error["param"] == param and f"<= {limit}" in error["message"], error


# ---- chat roles --------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["wizard", "tool", "function", "ipython", "User", ""])
def test_unknown_chat_roles_are_400_naming_the_role(env: Env, http: httpx.Client, role: str) -> None:
    messages = [*USER, {"role": role, "content": "y"}]
    error = _refused_before_the_backend(env, http, "chat/completions", {"model": MODEL, "messages": messages})
    assert error["param"] == "messages[1].role", error
    assert f"`{role}`" in error["message"], error


def test_a_developer_message_is_a_system_message(env: Env) -> None:
    messages: list[Any] = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    response = env.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    submit = next(s for s in env.backend.submits if s.request_id == response.id)
    assert submit.prompt_token_ids == env.chat_prompt([{**messages[0], "role": "system"}, messages[1]])


def test_an_empty_message_list_is_400(env: Env, http: httpx.Client) -> None:
    error = _refused_before_the_backend(env, http, "chat/completions", {"model": MODEL, "messages": []})
    assert error["param"] == "messages", error


# ---- fields the server does not implement ------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("completions", {"best_of": 3}, "best_of"),
        ("completions", {"suffix": "end"}, "suffix"),
        ("completions", {"stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
        ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("chat/completions", {"tool_choice": "required"}, "tool_choice"),
        ("chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("chat/completions", {"function_call": {"name": "f"}}, "function_call"),
        ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("chat/completions", {"store": True}, "store"),
        ("chat/completions", {"service_tier": "flex"}, "service_tier"),
        ("chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ("chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ("chat/completions", {"reasoning_effort": "high"}, "reasoning_effort"),
        ("chat/completions", {"verbosity": "low"}, "verbosity"),
        ("chat/completions", {"web_search_options": {}}, "web_search_options"),
        (
            "chat/completions",
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
            "messages[0].tool_calls",
        ),
        ("chat/completions", {"messages": [{"role": "assistant", "refusal": "no"}]}, "messages[0].refusal"),
    ],
)
def test_unimplemented_fields_are_400_naming_the_field(
    env: Env, http: httpx.Client, path: str, fields: dict[str, Any], param: str
) -> None:
    error = _refused_before_the_backend(env, http, path, _minimal(path, fields))
    assert error["param"] == param, error
    assert f"`{param.rsplit('.', 1)[-1]}`" in error["message"] and "not support" in error["message"], error


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("completions", {"length_penalty": 1.2}, "length_penalty"),
        ("chat/completions", {"use_beam_search": True}, "use_beam_search"),
        ("chat/completions", {"messages": [{"role": "user", "content": "x", "weight": 1}]}, "messages[0].weight"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {}}]}]},
            "messages[0].content[0].cache_control",
        ),
        ("completions", {"stream_options": {"include_usage": True, "chunk_size": 4}}, "stream_options.chunk_size"),
    ],
)
def test_unknown_fields_are_400_naming_the_field(
    env: Env, http: httpx.Client, path: str, fields: dict[str, Any], param: str
) -> None:
    error = _refused_before_the_backend(env, http, path, _minimal(path, fields))
    assert error["param"] == param, error
    assert error["message"] == f"Unrecognized request argument supplied: {param}", error


def test_neutral_values_of_unimplemented_fields_are_accepted(env: Env, http: httpx.Client) -> None:
    completion = {
        "model": MODEL,
        "prompt": "x",
        "max_tokens": 2,
        "n": 1,
        "best_of": 1,
        "echo": False,
        "suffix": None,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "user": "someone",
        "stream_options": {"include_usage": False, "include_obfuscation": False},
    }
    r = _post(http, "completions", completion)
    assert r.status_code == 200, r.text
    r = _post(http, "completions", {**completion, "suffix": "", "logit_bias": None, "echo": None, "n": None})
    assert r.status_code == 200, r.text
    chat = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "be brief", "name": "rules"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "hello", "tool_calls": [], "refusal": None, "audio": None},
            {"role": "user", "content": "again", "tool_call_id": None, "function_call": None},
        ],
        "max_completion_tokens": 2,
        "n": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "logit_bias": None,
        "tools": [],
        "tool_choice": "none",
        "parallel_tool_calls": True,
        "functions": [],
        "function_call": "auto",
        "response_format": {"type": "text"},
        "store": False,
        "service_tier": "auto",
        "modalities": ["text"],
        "audio": None,
        "prediction": None,
        "reasoning_effort": None,
        "verbosity": "medium",
        "web_search_options": None,
        "metadata": {"team": "search"},
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "user": "someone",
        "logprobs": False,
        "stream": False,
    }
    r = _post(http, "chat/completions", chat)
    assert r.status_code == 200, r.text
    r = _post(http, "chat/completions", {**chat, "tool_choice": "auto", "service_tier": "default", "tools": None})
    assert r.status_code == 200, r.text
    # The official client sends what it is given, as it is given.
    response = env.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        n=1,
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        response_format={"type": "text"},
        store=False,
        tool_choice="none",
    )
    assert response.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as bad:
        env.client().completions.create(model=MODEL, prompt="x", best_of=2)
    assert bad.value.response.json()["error"]["param"] == "best_of"


# ---- methods and schema ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/completions", "POST"),
        ("PUT", "/v1/chat/completions", "POST"),
        ("POST", "/v1/models", "GET"),
        ("DELETE", "/health", "GET"),
    ],
)
def test_405_carries_allow(http: httpx.Client, method: str, path: str, allowed: str) -> None:
    r = http.request(method, path)
    _refused(r, 405)
    assert allowed in [m.strip() for m in r.headers["allow"].split(",")], r.headers


def _value(schema: dict[str, Any]) -> dict[str, Any]:
    """A nullable field's schema for its non-null values (msgspec writes `anyOf: [<value>, {"type": "null"}]`)."""
    members = [m for m in schema.get("anyOf", [schema]) if m.get("type") != "null"]
    assert len(members) == 1, schema
    member: dict[str, Any] = members[0]
    return member


def test_the_schema_states_the_limits(env: Env, http: httpx.Client) -> None:
    """The limits, as the document states them; tests/integration/test_gateway_schema.py holds the whole
    document to what the server does."""
    schemas = http.get("/schema/openapi.json").json()["components"]["schemas"]
    completion, chat = schemas["CompletionRequest"]["properties"], schemas["ChatCompletionRequest"]["properties"]
    text, tokens, texts, token_lists = completion["prompt"]["anyOf"]
    assert (text["minLength"], tokens["minItems"], texts["items"]["minLength"]) == (1, 1, 1)
    assert (tokens["items"]["minimum"], tokens["items"]["maximum"]) == (0, env.vocab - 1)
    assert (texts["maxItems"], token_lists["maxItems"]) == (MAX_CHOICES, MAX_CHOICES)
    assert chat["messages"]["minItems"] == 1
    assert (_value(completion["top_k"])["minimum"], _value(completion["top_k"])["maximum"]) == (-1, MAX_TOP_K)
    string, strings, _ = completion["stop"]["anyOf"]
    assert (strings["maxItems"], strings["items"]["maxLength"], string["maxLength"]) == (
        MAX_STOP_STRINGS,
        MAX_STOP_LENGTH,
        MAX_STOP_LENGTH,
    )
    assert (_value(completion["logprobs"])["minimum"], _value(completion["logprobs"])["maximum"]) == (0, 20)
    assert (_value(chat["top_logprobs"])["minimum"], _value(chat["top_logprobs"])["maximum"]) == (0, 20)
    assert _value(completion["temperature"])["minimum"] == 0
    assert _value(chat["max_completion_tokens"])["minimum"] == 1
    assert (_value(completion["top_p"])["exclusiveMinimum"], _value(completion["top_p"])["maximum"]) == (0, 1)
    assert _value(completion["repetition_penalty"])["exclusiveMinimum"] == 0
    assert schemas["ChatMessage"]["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant"]
    for name in ("best_of", "suffix"):
        assert completion[name]["description"].startswith("Not supported"), name
    assert completion["suffix"]["enum"] == [None, ""]
    assert (_value(completion["best_of"])["minimum"], _value(completion["best_of"])["maximum"]) == (1, MAX_CHOICES)
    assert "the value of `n`" in completion["best_of"]["description"]
    assert (_value(chat["min_p"])["minimum"], _value(chat["min_p"])["maximum"]) == (0, 1)
    words = _value(chat["bad_words"])
    assert (words["maxItems"], words["items"]["maxLength"], words["items"]["pattern"]) == (
        MAX_BAD_WORDS,
        MAX_BAD_WORD_LENGTH,
        NOT_SPACE,
    )
    assert (_value(completion["prompt_logprobs"])["minimum"], _value(completion["prompt_logprobs"])["maximum"]) == (
        0,
        20,
    )
    for name in ("tools", "tool_choice", "response_format"):
        assert chat[name]["description"].startswith("Not supported"), name
    assert chat["tool_choice"]["enum"] == [None, "none", "auto"]
    assert (_value(completion["n"])["minimum"], _value(completion["n"])["maximum"]) == (1, MAX_CHOICES)
    assert (_value(chat["presence_penalty"])["minimum"], _value(chat["presence_penalty"])["maximum"]) == (-2, 2)
    assert _value(completion["logit_bias"])["maxProperties"] == 300
    assert completion["model"]["enum"] == [MODEL, None]
    assert schemas["CompletionRequest"]["additionalProperties"] is False
