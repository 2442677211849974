"""`/tokenize`, `/detokenize` and `/version` (vLLM's utility routes) on the gateway, over the stand-in backend."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import httpx
import pytest

from tests.integration.gateway_harness import API_KEY, MODEL, Env
from tests.integration.gateway_harness import env as env  # the module fixture, a fresh instance for this module

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _post(env: Env, path: str, body: dict[str, Any], headers: dict[str, str] = AUTH) -> httpx.Response:
    return httpx.post(f"{env.url}{path}", json=body, headers=headers, timeout=10)


@pytest.mark.timeout(60)
def test_tokenize_gives_the_ids_a_completion_is_served_with(env: Env) -> None:
    text = "scheduler and kernel"
    r = _post(env, "/tokenize", {"model": MODEL, "prompt": text})
    assert r.status_code == 200, r.text
    ids = env.tokenizer(text).input_ids
    assert r.json() == {"count": len(ids), "max_model_len": 2048, "tokens": ids}
    bare = _post(env, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert bare == env.tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.timeout(60)
def test_tokenize_messages_as_chat_does(env: Env) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "kernel?"}]
    r = _post(env, "/tokenize", {"messages": messages})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == env.chat_prompt(messages)  # what /v1/chat/completions sends the backend
    opened = _post(env, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()["tokens"]
    assert len(opened) < r.json()["count"]  # without the assistant turn's opening


@pytest.mark.timeout(60)
def test_detokenize_reverses_tokenize(env: Env) -> None:
    text = "scheduler and kernel"
    ids = _post(env, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]
    r = _post(env, "/detokenize", {"model": MODEL, "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": text}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]}, "messages[0].tool_calls"),
        ("/tokenize", {"prompt": "x", "model": "gpt-17"}, "model"),
        ("/detokenize", {"tokens": [5, -1]}, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ],
)
def test_bad_utility_requests_are_4xx_naming_the_field(env: Env, path: str, body: dict[str, Any], param: str) -> None:
    r = _post(env, path, body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.timeout(60)
def test_version_and_keys(env: Env) -> None:
    r = httpx.get(f"{env.url}/version", headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json() == {"version": version("adrenaline")}
    for path in ("/tokenize", "/detokenize"):  # behind the same keys as /v1
        assert _post(env, path, {"tokens": [1], "prompt": "x"}, headers={}).status_code == 401
    assert httpx.get(f"{env.url}/version", timeout=10).status_code == 401
