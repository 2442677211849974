"""The gateway's text handling without a server: incremental detokenization, stop strings, prompt checks."""

from __future__ import annotations

import random
import re
from typing import Any

import pytest

from common.messages import Sampling, TokenEvent
from common.model.tiny import make_tokenizer
from services.gateway.errors import APIError
from services.gateway.openai_types import NOT_SPACE, ChatMessage, CompletionRequest
from services.gateway.prompts import PromptBuilder
from services.gateway.responses import Choice, Outcome, Shapes
from services.gateway.text import Piece, TextStream


class PieceTokenizer:
    """Token i is PIECES[i]; decoding joins them, as a byte-level BPE does for whole characters."""

    PIECES = ("hel", "lo ", "wor", "ld", "!")

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.PIECES[t] for t in token_ids)


def _event(*tokens: int, finish: str | None = None) -> TokenEvent:
    return TokenEvent("r", list(tokens), finish_reason=finish)


def test_text_that_may_start_a_stop_string_is_held_back_then_cut() -> None:
    text = TextStream(PieceTokenizer(), ["o w"])
    assert text.add(_event(0)).text == "hel"
    assert text.add(_event(1)).text == "l"  # "o " could begin "o w": held back
    piece = text.add(_event(2))  # "hello wor": the stop string is there
    assert (piece.text, text.text, text.finish_reason, text.stopped_by_string) == ("", "hell", "stop", True)
    assert piece.token_ids == [2]  # the last piece carries the tokens (and logprobs) not yet sent


def test_held_back_text_is_released_when_the_stop_string_does_not_follow() -> None:
    text = TextStream(PieceTokenizer(), ["o w", "lo !"])
    pieces = [text.add(_event(0)), text.add(_event(1)), text.add(_event(3)), text.add(_event(4, finish="length"))]
    assert [p.text for p in pieces] == ["he", "l", "lo ld", "!"]  # "l", then "lo ", could begin "lo !"
    assert (text.text, text.finish_reason, text.stopped_by_string) == ("hello ld!", "length", False)


def test_a_character_split_across_tokens_waits_for_its_last_byte() -> None:
    tokenizer = make_tokenizer(384)
    first, second = tokenizer.encode("é", add_special_tokens=False)  # the byte-level pieces of C3 A9
    assert tokenizer.convert_ids_to_tokens([first, second]) == ["Ã", "©"]
    text = TextStream(tokenizer, [])
    assert text.add(_event(first)).text == ""
    assert text.add(_event(second, finish="length")).text == "é"


@pytest.fixture(scope="module")
def prompts() -> PromptBuilder:
    return PromptBuilder(make_tokenizer(384), "m", max_model_len=64, vocab_size=384)


def test_prompt_checks(prompts: PromptBuilder) -> None:
    def ids(prompt: Any) -> list[list[int]]:
        return [p.token_ids for p in prompts.completion_prompts(CompletionRequest(prompt=prompt))]

    assert ids([[3, 4, 5]]) == [[3, 4, 5]]  # a batch of one
    assert ids([[1], [2, 3]]) == [[1], [2, 3]]
    assert ids(["ab", "c"]) == [prompts.tokenizer("ab").input_ids, prompts.tokenizer("c").input_ids]
    assert [p.text for p in prompts.completion_prompts(CompletionRequest(prompt=["ab", "c"]))] == ["ab", "c"]
    cases: list[tuple[list[Any], str, str]] = [
        ([1, 999], "token ids must be in", "prompt"),
        ([], "must not be empty", "prompt"),
        ([1.5], "a string or a list of token ids", "prompt"),
        (["a", [1]], "all strings or all lists", "prompt"),
        ([1, "a"], "all strings or all lists", "prompt"),
        (["a", ""], "must not be empty", "prompt[1]"),
        ([[1], [2, 999]], "token ids must be in", "prompt[1]"),
        ([[1], []], "must not be empty", "prompt[1]"),
    ]
    for prompt, message, param in cases:
        with pytest.raises(APIError, match=message) as bad:
            prompts.completion_prompts(CompletionRequest(prompt=prompt))
        assert (bad.value.status, bad.value.param) == (400, param)


def test_a_tokenizer_without_a_chat_template_is_a_clear_400(prompts: PromptBuilder) -> None:
    prompts.tokenizer.chat_template = None
    with pytest.raises(APIError, match="no chat template") as bad:
        prompts.chat_prompt([ChatMessage(role="user", content="hi")])
    assert (bad.value.status, bad.value.param) == (400, "messages")


def test_max_tokens_defaults_to_16_within_the_context(prompts: PromptBuilder) -> None:
    request = CompletionRequest(prompt="x")
    assert prompts.sampling(request, 10, None, None).max_new_tokens == 16
    assert prompts.sampling(request, 60, None, None).max_new_tokens == 4
    with pytest.raises(APIError) as bad:
        prompts.sampling(request, 64, None, None)
    assert (bad.value.param, bad.value.code) == ("prompt", "context_length_exceeded")


def test_incremental_text_equals_decoding_the_whole_output() -> None:
    """Decoding a window per step gives exactly what decoding everything at once gives, whatever the
    tokens: multi-byte characters split across tokens, ids chosen at random, one or several per event."""
    tokenizer = make_tokenizer(384)
    rng = random.Random(5)
    samples = ["naïve café ☕ — 日本語 🙂", "hello world, hello again", "ümlaut ß ø 🚀🚀 end"]
    streams = [tokenizer.encode(s, add_special_tokens=False) for s in samples]
    streams += [[rng.randrange(3, 384) for _ in range(80)] for _ in range(5)]
    for ids in streams:
        text = TextStream(tokenizer, [])
        i = 0
        while i < len(ids):
            n = rng.randint(1, 3)
            last = i + n >= len(ids)
            text.add(_event(*ids[i : i + n], finish="length" if last else None))
            i += n
        assert text.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_include_stop_str_in_output_keeps_the_stop_string() -> None:
    text = TextStream(PieceTokenizer(), ["o w"], include_stop=True)
    pieces = [text.add(_event(0)), text.add(_event(1)), text.add(_event(2)), text.add(_event(3))]
    assert [p.text for p in pieces] == ["hel", "l", "o w", ""]
    assert (text.text, text.finish_reason, text.stopped_by_string) == ("hello w", "stop", True)


def test_stop_strings_wait_for_min_tokens() -> None:
    """As vLLM: no stop string ends the output before it has `min_tokens` tokens."""
    text = TextStream(PieceTokenizer(), ["lo"], min_tokens=3)
    text.add(_event(0))
    text.add(_event(1))  # "hello ": "lo" is there, but only 2 tokens
    assert not text.finished
    text.add(_event(2))
    text.add(_event(1))  # "hello worlo ": the next "lo" ends it
    assert (text.text, text.finish_reason) == ("hello wor", "stop")


def test_a_stop_token_leaves_its_text_out_unless_asked() -> None:
    """The backend ended on a stop token (finish_reason "stop"): its text is not the output's, as in vLLM."""
    for include, expected in ((False, "hello "), (True, "hello wor")):
        text = TextStream(PieceTokenizer(), [], include_stop=include)
        text.add(_event(0, 1))
        text.add(_event(2, finish="stop"))
        assert text.text == expected
    text = TextStream(PieceTokenizer(), [])
    text.add(_event(0, 1, finish="length"))
    assert text.text == "hello "


def test_special_tokens_are_in_the_text_only_when_asked() -> None:
    tokenizer = make_tokenizer(384)
    ids = [*tokenizer.encode("hi", add_special_tokens=False), tokenizer.eos_token_id]
    for skip, expected in ((True, "hi"), (False, "hi" + tokenizer.eos_token)):
        text = TextStream(tokenizer, [], skip_special_tokens=skip, include_stop=True)
        text.add(_event(*ids, finish="stop"))
        assert text.text == expected
    text = TextStream(tokenizer, [], skip_special_tokens=False)  # the stop token's text is left out
    text.add(_event(*ids, finish="stop"))
    assert text.text == "hi"


def test_echoed_logprobs_put_the_prompts_before_the_outputs() -> None:
    """OpenAI's legacy `logprobs` with `echo`: the prompt's tokens first (the first with a null
    logprob and null alternatives: it has no context), then the output's; offsets run on through
    the echoed text; at most `logprobs` alternatives each, however many the prompt's have."""
    tokenizer = PieceTokenizer()
    sampling = Sampling(max_new_tokens=2, logprobs=1, prompt_logprobs=2)
    choice = Choice(0, 0, 0, [0, 1, 2], sampling, echo="hello wor")
    prompt = Piece(
        token_ids=[0, 1, 2], logprobs=[-1.0, -2.0], top_logprobs=[[(1, -1.0), (4, -3.0)], [(3, -0.5), (2, -2.0)]]
    )
    output = Piece(text="ld!", token_ids=[3, 4], logprobs=[-0.25, -0.75], top_logprobs=[[(3, -0.25)], [(0, -0.5)]])
    outcome = Outcome(choice, output, "length", 2, prompt)
    body = Shapes(tokenizer, False, "cmpl-1", 0, "m").body([outcome], logprobs=True)
    [shaped] = body.choices
    assert shaped.text == "hello world!"
    assert shaped.logprobs == {
        "tokens": ["hel", "lo ", "wor", "ld", "!"],
        "token_logprobs": [None, -1.0, -2.0, -0.25, -0.75],
        "top_logprobs": [None, {"lo ": -1.0}, {"ld": -0.5}, {"ld": -0.25}, {"hel": -0.5}],
        "text_offset": [0, 3, 6, 9, 11],
    }
    assert shaped.prompt_logprobs is not None and shaped.prompt_logprobs[0] is None
    assert {k: (v.logprob, v.rank) for k, v in shaped.prompt_logprobs[2].items()} == {"2": (-2.0, 2), "3": (-0.5, 1)}


def test_the_bad_words_pattern_is_pythons_not_a_space_spelled_out() -> None:
    """`bad_words` entries must keep a character after `str.lstrip`; the document states it as a class
    that ECMA-262 and Python read alike (every space character is in the Basic Multilingual Plane)."""
    pattern = re.compile(NOT_SPACE)
    assert all((pattern.fullmatch(c) is None) == c.isspace() for c in map(chr, range(0x10000)))
