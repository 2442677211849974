"""Logits processors against transformers' own, row by row, and the sampler around them."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from common.errors import InvalidRequestError
from common.logits_processors import History, process_logits
from common.sampling import SamplingParams, _step_generator, sample

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


def test_bad_words_equal_transformers_over_the_output() -> None:
    """Each row's output ends differently: a one-token word is always banned, a longer one only where
    the output ends with all of it but its last token (transformers' `NoBadWordsLogitsProcessor`
    given the output as its ids: vLLM, whose semantics these are, matches the output only)."""
    words = ((5,), (7, 8), (1, 2, 3), (9, 9, 4))
    outputs = [[6, 7], [0, 1, 2], [9, 9], [6, 6, 6], [1, 2, 7, 9, 9]]
    params = [SamplingParams(bad_words=words) for _ in outputs]
    logits = _logits(len(outputs), seed=6)
    out = process_logits(logits, params, [([7, 1, 2], o) for o in outputs])  # prompts end with prefixes too
    reference = NoBadWordsLogitsProcessor([list(w) for w in words])
    for row, output in enumerate(outputs):
        expected = reference(torch.tensor([output]), logits[row : row + 1].clone())[0]
        torch.testing.assert_close(out[row], expected)
    banned = [sorted(int(t) for t in torch.nonzero(row == float("-inf"))) for row in out]
    assert banned == [[5, 8], [3, 5], [4, 5], [5], [4, 5]]


def test_seeded_min_p_draws_equal_transformers_warpers() -> None:
    """min_p after temperature, top-k and top-p, in transformers' order; the engine's noise for (seed,
    step) makes the draws comparable one for one, and min_p must change some for this to mean much."""
    logits = _logits(6, seed=8)
    rows = [
        SamplingParams(seed=3, temperature=1.7, min_p=0.05),
        SamplingParams(seed=4, temperature=0.6, min_p=0.3, top_k=12),
        SamplingParams(seed=5, temperature=2.5, min_p=0.5, top_p=0.8),
        SamplingParams(seed=6, temperature=1.0, min_p=1.0),  # only the likeliest token is left
        SamplingParams(seed=7, temperature=2.0),  # no min_p, beside rows that have one
        SamplingParams(temperature=0.0, min_p=0.9),  # greedy: the argmax, whatever min_p
    ]
    changed = 0
    for step in range(40):
        got = sample(logits, rows, [step] * len(rows)).token_ids
        for i, p in enumerate(rows[:5]):
            assert p.seed is not None
            chain = [TemperatureLogitsWarper(p.temperature)]
            chain += [TopKLogitsWarper(p.top_k)] if p.top_k else []
            chain += [TopPLogitsWarper(p.top_p)] if p.top_p < 1 else []
            plain = LogitsProcessorList(chain)(torch.LongTensor([[0]]), logits[i : i + 1].clone())
            scores = MinPLogitsWarper(p.min_p)(torch.LongTensor([[0]]), plain.clone()) if p.min_p else plain
            noise = torch.empty(VOCAB).exponential_(generator=_step_generator(p.seed, step))
            assert got[i] == int((torch.softmax(scores[0], -1) / noise).argmax()), (i, step)
            changed += int((torch.softmax(plain[0], -1) / noise).argmax()) != got[i]
        assert got[3] == int(logits[3].argmax())
        assert got[5] == int(logits[5].argmax())
    assert changed > 0


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
        ("min_p", {"min_p": -0.1}),
        ("min_p", {"min_p": 1.5}),
        ("bad_words", {"bad_words": ((),)}),
        ("bad_words", {"bad_words": ((3, -1),)}),
        ("bad_words", {"bad_words": tuple((i,) for i in range(129))}),
        ("bad_words", {"bad_words": (tuple(range(513)),)}),
        ("prompt_logprobs", {"prompt_logprobs": 21}),
    ],
)
def test_bad_processor_values_name_their_field(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field
