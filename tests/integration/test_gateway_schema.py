"""The gateway against its own OpenAPI document: schemathesis, every check it has, every operation.

The document (`/schema/openapi.json`, built by services/gateway/openapi.py) promises what a body
may hold, which statuses, headers and bodies each route answers with, and that the API key is
required. schemathesis generates requests from it (its examples, coverage and fuzzing phases;
valid bodies and bodies broken on purpose) and checks each answer against it, so a constraint the
server enforces but the document does not state (a valid body refused), a constraint the document
states but the server does not enforce (an invalid body served), a status or header it does not
declare, or a body of the wrong shape, fails this test. The gateway is the real app under uvicorn
in front of the stand-in backend on a real NATS server (gateway_harness.py), with API keys on.

Deterministic: a fixed seed (each operation's examples derive from it and the operation's name),
no example database, and a bounded number of examples per operation.

What the checks cannot see, and is excluded narrowly, each for its stated reason:
- Rules across fields that JSON Schema cannot state (a prompt's tokens plus `max_tokens` must fit
  the context: only the tokenizer knows a text prompt's length; `min_tokens` <= `max_tokens`; `n`
  times the prompts of a batch; `best_of` other than `n`; `top_logprobs` without `logprobs`;
  `continue_final_message`'s conditions). The document states them in the bodies' descriptions.
  A schema-valid body that breaks one may be answered with a 400, but only with the error this
  test predicts from the body itself (`_rule_broken`): the same field, and for the context the
  `context_length_exceeded` code. Any other 400 still fails `positive_data_acceptance`.
- `use_after_free`, `ensure_resource_availability` and `object_level_authorization` look at
  resources one call creates and another reads or deletes; this API has none (and its document
  no links), so they pass trivially. They run all the same: a resource route added later is checked.
- The stateful phase needs links between operations; the document has none, so it is off.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import schemathesis
from schemathesis import Case, CheckContext, Response
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.core.result import Ok
from schemathesis.engine import Status, StopReason, events
from schemathesis.schemas import BaseSchema

from services.gateway.openai_types import MAX_CHOICES
from services.gateway.prompts import DEFAULT_MAX_TOKENS
from tests.integration.gateway_harness import API_KEY, Env
from tests.integration.gateway_harness import env as env  # the module fixture, a fresh instance for this module

SEED = 20261129
MAX_EXAMPLES = 100  # per operation, in the fuzzing phase (the coverage phase adds its own, fewer)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def document(env: Env) -> Iterator[BaseSchema]:
    """The gateway's own document, with schemathesis configured to call it as an authorised client."""
    env.backend.burst = True  # a fuzzer asks for thousands of tokens; the stand-in sends them in one event
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
            "phases": {"stateful": {"enabled": False}},  # no links between operations: nothing to chain
            "checks": {"positive_data_acceptance": {"enabled": False}},  # replaced, see below
            "auth": {"openapi": {"bearer": {"bearer": API_KEY}}},
            "workers": 1,  # one operation at a time: the order, and so the run, is the same every time
            "request-timeout": 30,
            # failures show the bodies as sent: only the key is hidden (by default, any field named like
            # `max_tokens` or `prompt_cache_key` would be too)
            "output": {"sanitization": {"keys-to-sanitize": ["authorization"], "sensitive-markers": ["authorization"]}},
        }
    )
    yield schemathesis.openapi.from_url(f"{env.url}/schema/openapi.json", config=config)
    env.backend.burst = False


def _rule_broken(case: Case) -> tuple[str | None, str | None] | None:
    """The (param, code) of the 400 a schema-valid body must get for breaking a rule across fields, if it
    breaks one that the server checks before the context (`prompts.py`, the route handlers)."""
    body: dict[str, Any] = case.body if isinstance(case.body, dict) else {}
    path = case.operation.path
    if path == "/v1/completions":
        prompt = body.get("prompt")
        batch = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
        n = body.get("n") or 1
        if body.get("best_of") is not None and body["best_of"] != n:
            return "best_of", None
        if n * batch > MAX_CHOICES:
            return ("n" if n > 1 else "prompt"), None
    if path == "/v1/chat/completions" and body.get("top_logprobs") is not None and not body.get("logprobs"):
        return "top_logprobs", None
    if path in ("/v1/chat/completions", "/tokenize") and body.get("continue_final_message"):
        messages = body.get("messages") or []
        if body.get("add_generation_prompt") is not False or not messages or messages[-1]["role"] != "assistant":
            return "continue_final_message", None
    return None


def _rule_after_tokenizing(case: Case) -> str | None:
    """The param of a 400 a schema-valid generation body may get once its prompt is tokenized."""
    body: dict[str, Any] = case.body if isinstance(case.body, dict) else {}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if (body.get("min_tokens") or 0) > (max_tokens or DEFAULT_MAX_TOKENS):
        return "min_tokens"
    return None


@schemathesis.check
def positive_data_acceptance_but_rules_across_fields(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """schemathesis's `positive_data_acceptance`, except for a 400 that a rule across fields predicts.

    The document cannot state those rules in JSON Schema (see the module's docstring); a body that
    breaks one is refused with the error predicted here and no other, so the server cannot refuse a
    valid body for an undocumented reason and pass."""
    builtin = cast(Callable[[CheckContext, Response, Case], bool | None], CHECKS.get_one("positive_data_acceptance"))
    try:
        return builtin(ctx, response, case)
    except AssertionError:
        if response.status_code != 400:
            raise
        error = json.loads(response.content)["error"]
        if (error["param"], error["code"]) == _rule_broken(case):
            return None
        if _rule_broken(case) is None and case.operation.path.startswith("/v1/"):
            if error["code"] == "context_length_exceeded":  # prompt + max_tokens past the context
                return None
            if error["param"] is not None and error["param"] == _rule_after_tokenizing(case):
                return None
        raise


def test_every_check_schemathesis_has_runs() -> None:
    """`call_and_validate` with no explicit list runs every check the configuration enables, and the
    configuration above enables all of them (`--checks all`); these are the ones this version has."""
    load_all_checks()
    assert set(CHECKS.get_all_names()) >= {
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "positive_data_acceptance",
        "missing_required_header",
        "unsupported_method",
        "allow_header_conformance",
        "use_after_free",
        "ensure_resource_availability",
        "ignored_auth",
        "object_level_authorization",
    }


def test_the_gateway_answers_as_its_document_says(document: BaseSchema) -> None:
    """schemathesis's engine (what `st run` runs) over every operation of the document, with every check.

    Its pytest integration (`schemathesis.pytest.from_fixture`) does not run under pytest 9 (it sets
    a node attribute pytest no longer has), hence the engine, whose events carry each failure."""
    failures: list[str] = []
    tested: dict[str, set[str]] = {}
    cases = 0
    finished: events.EngineFinished | None = None
    for event in schemathesis.engine.from_schema(document).execute():
        if isinstance(event, events.ScenarioFinished):
            cases += len(event.recorder.cases)
            if event.status is Status.SUCCESS and event.label is not None:
                tested.setdefault(event.label, set()).add(event.phase.value)
            for case_id, nodes in event.recorder.checks.items():
                interaction = event.recorder.interactions.get(case_id)
                answer = interaction.response if interaction is not None else None
                answered = f"{answer.status_code} {answer.content[:500]!r}" if answer is not None else "no answer"
                failures += [
                    f"{event.label} [{event.phase.value}] {node.name}: {node.failure_info.failure.title}\n"
                    f"{node.failure_info.failure.message}\n{node.failure_info.code_sample}\n-> {answered}"
                    for node in nodes
                    if node.failure_info is not None
                ]
        elif isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(f"schemathesis error: {event!r}")
        elif isinstance(event, events.EngineFinished):
            finished = event
    assert not failures, "\n\n".join(dict.fromkeys(failures))
    assert finished is not None and finished.stop_reason is StopReason.COMPLETED, finished
    operations = {f"{method} {path}" for method, path in _operations(document)}
    assert {label: phases >= {"coverage", "fuzzing"} for label, phases in tested.items()} == dict.fromkeys(
        operations, True
    ), tested
    assert cases > 100 * len(operations) // 2, cases  # it did generate requests, not skip them


def _operations(document: BaseSchema) -> set[tuple[str, str]]:
    loaded = [result.ok() for result in document.get_all_operations() if isinstance(result, Ok)]
    assert len(loaded) == len(list(document.get_all_operations())), "an operation of the document does not load"
    return {(operation.method.upper(), operation.path) for operation in loaded}


def test_the_document_covers_every_route(document: BaseSchema) -> None:
    """The operations the test above runs: every route the gateway serves to clients (not /health, /live,
    /metrics, which are for the cluster's operators and are left out of the document on purpose)."""
    assert _operations(document) == {
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("GET", "/version"),
    }
