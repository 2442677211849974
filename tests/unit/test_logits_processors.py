"""Logits processors against transformers' own, row by row, and the sampler around them."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from common.errors import InvalidRequestError
from common.logits_processors import History, process_logits
from common.sampling import SamplingParams, sample

VOCAB = 40


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _history(seed: int, prompt_len: int, output_len: int) -> History:
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, VOCAB, (prompt_len,), generator=gen).tolist()
    output = torch.randint(0, VOCAB, (output_len,), generator=gen).tolist()
    return prompt, output


def _openai_penalties(logits: torch.Tensor, output: list[int], frequency: float, presence: float) -> torch.Tensor:
    """OpenAI's definition, token by token: mu[j] - c[j] * f - (c[j] > 0) * p, over the output."""
    out = logits.clone()
    for token in set(output):
        count = output.count(token)
        out[token] -= count * frequency + presence
    return out


def test_each_processor_equals_transformers_and_openai_row_by_row() -> None:
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.7),
        SamplingParams(min_tokens=5, stop_token_ids=(3, 7), eos_token_ids=(2,)),
        SamplingParams(min_tokens=5, stop_token_ids=(3,), eos_token_ids=(2,), ignore_eos=True),
        SamplingParams(logit_bias=((4, 5.0), (9, -100.0), (11, 0.5))),
        SamplingParams(frequency_penalty=0.8, presence_penalty=-0.4),
        SamplingParams(),  # no processor: untouched
        SamplingParams(
            logit_bias=((1, 2.0),), repetition_penalty=1.5, frequency_penalty=0.3, presence_penalty=1.1, min_tokens=9
        ),
    ]
    histories = [_history(i, prompt_len=3 + i, output_len=(4, 6, 3, 3, 2, 12, 5, 20)[i]) for i in range(len(params))]
    logits = _logits(len(params))
    before = logits.clone()
    out = process_logits(logits, params, histories)
    assert torch.equal(logits, before), "the model's logits are not changed in place"

    def hf(row: int, processors: list[object]) -> torch.Tensor:
        prompt, output = histories[row]
        ids = torch.tensor([[*prompt, *output]])
        return LogitsProcessorList(processors)(ids, logits[row : row + 1].clone())[0]  # type: ignore[arg-type]

    torch.testing.assert_close(out[0], hf(0, [RepetitionPenaltyLogitsProcessor(1.3)]))
    torch.testing.assert_close(out[1], hf(1, [RepetitionPenaltyLogitsProcessor(0.7)]))
    prompt_len = len(histories[2][0])
    torch.testing.assert_close(out[2], hf(2, [MinNewTokensLengthLogitsProcessor(prompt_len, 5, [3, 7, 2])]))
    prompt_len = len(histories[3][0])
    torch.testing.assert_close(out[3], hf(3, [MinNewTokensLengthLogitsProcessor(prompt_len, 5, [3])]))
    bias = SequenceBiasLogitsProcessor([[[4], 5.0], [[9], -100.0], [[11], 0.5]])
    torch.testing.assert_close(out[4], hf(4, [bias]))
    torch.testing.assert_close(out[5], _openai_penalties(logits[5], list(histories[5][1]), 0.8, -0.4))
    assert torch.equal(out[6], logits[6])
    # all at once, in vLLM's order: bias, min_tokens, repetition, then frequency and presence
    prompt_len = len(histories[7][0])
    staged = hf(
        7,
        [
            SequenceBiasLogitsProcessor([[[1], 2.0]]),
            MinNewTokensLengthLogitsProcessor(prompt_len, 9, [2]),  # 5 outputs < 9: EOS masked
            RepetitionPenaltyLogitsProcessor(1.5),
        ],
    )
    torch.testing.assert_close(out[7], _openai_penalties(staged, list(histories[7][1]), 0.3, 1.1))


def test_min_tokens_lifts_the_mask_once_reached() -> None:
    params = [SamplingParams(min_tokens=3, stop_token_ids=(5,))]
    logits = _logits(1)
    assert process_logits(logits, params, [([1], [6, 6])])[0, 5] == float("-inf")
    assert torch.equal(process_logits(logits, params, [([1], [6, 6, 6])]), logits)


def test_greedy_rows_take_the_processed_argmax_and_report_raw_logprobs() -> None:
    logits = _logits(2, seed=3)
    winner = int(logits[0].argmin())
    params = [SamplingParams(temperature=0.0, logit_bias=((winner, 100.0),), logprobs=1), SamplingParams(temperature=0)]
    result = sample(logits, params, [0, 0], histories=[([1], []), ([1], [])])
    assert result.token_ids == [winner, int(logits[1].argmax())]
    assert result.logprobs is not None
    assert result.logprobs[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[winner]), abs=1e-6)


def test_seeded_draws_come_from_the_processed_distribution() -> None:
    """With the same noise, a seeded row with a processor draws what a row given the processed logits draws."""
    logits = _logits(1, seed=4)
    history: History = ([1, 2, 3], [4, 4, 5])
    penalized = SamplingParams(seed=7, repetition_penalty=1.8, frequency_penalty=0.5, temperature=0.9, top_k=8)
    plain = SamplingParams(seed=7, temperature=0.9, top_k=8)
    processed = process_logits(logits, [penalized], [history])
    for step in range(30):
        got = sample(logits, [penalized], [step], histories=[history]).token_ids
        assert got == sample(processed, [plain], [step]).token_ids


def test_a_processor_without_a_history_is_a_bug_not_a_silent_no_op() -> None:
    with pytest.raises(ValueError, match="history"):
        sample(_logits(1), [SamplingParams(presence_penalty=1.0)], [0])


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("min_tokens", {"min_tokens": -1}),
        ("min_tokens", {"min_tokens": 17, "max_new_tokens": 16}),
        ("repetition_penalty", {"repetition_penalty": 0.0}),
        ("repetition_penalty", {"repetition_penalty": float("inf")}),
        ("presence_penalty", {"presence_penalty": 2.5}),
        ("frequency_penalty", {"frequency_penalty": float("nan")}),
        ("logit_bias", {"logit_bias": ((1, 101.0),)}),
        ("logit_bias", {"logit_bias": ((1, 1.0), (1, 2.0))}),
        ("logit_bias", {"logit_bias": ((-1, 1.0),)}),
        ("logit_bias", {"logit_bias": tuple((i, 1.0) for i in range(301))}),
    ],
)
def test_bad_processor_values_name_their_field(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field
