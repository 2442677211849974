from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from common.errors import InvalidRequestError
from common.sampling import SamplingParams, sample


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("max_new_tokens", {"max_new_tokens": 0}),
        ("max_new_tokens", {"max_new_tokens": 2.5}),
        ("temperature", {"temperature": -0.1}),
        ("temperature", {"temperature": math.nan}),
        ("temperature", {"temperature": "hot"}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.5}),
        ("top_k", {"top_k": -2}),
        ("seed", {"seed": -1}),
        ("stop_token_ids", {"stop_token_ids": (3, -4)}),
        ("logprobs", {"logprobs": 21}),
    ],
)
def test_bad_parameters_name_their_field(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field
    assert str(err.value).startswith(field)


def _logits(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_takes_the_argmax_and_reports_logprobs() -> None:
    logits = _logits(4)
    result = sample(logits, [SamplingParams(temperature=0.0, logprobs=3)] * 4, [0] * 4)
    assert result.token_ids == logits.argmax(-1).tolist()
    logp = torch.log_softmax(logits, -1)
    assert result.logprobs == pytest.approx(logp.max(-1).values.tolist(), abs=1e-6)
    assert result.top_logprobs is not None
    assert [t for t, _ in result.top_logprobs[2]] == logp[2].topk(3).indices.tolist()


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = _logits(6, seed=1)
    params = [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(3)]
    params += [SamplingParams(temperature=1.5, top_p=1e-6, seed=i) for i in range(3)]
    assert sample(logits, params, [0] * 6).token_ids == logits.argmax(-1).tolist()


def test_seeded_sampling_does_not_depend_on_the_batch() -> None:
    logits = _logits(5, seed=2)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone = sample(logits[3:4], [seeded], [7]).token_ids[0]
    others = [SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=0.0)]
    batch = [others[0], others[1], others[0], seeded, others[1]]
    for trial in range(5):
        gen = torch.Generator().manual_seed(trial)
        assert sample(logits, batch, [0, 1, 2, 7, 3], gen).token_ids[3] == alone
    # a different step gives fresh randomness: over many steps, more than one token is drawn
    flat = torch.zeros(1, 50)
    drawn = {sample(flat, [seeded], [step]).token_ids[0] for step in range(40)}
    assert len(drawn) > 10


def test_sampling_follows_the_distribution_and_the_top_k_and_top_p_masks() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    draws = 4000
    counts = torch.zeros(4)
    topk_seen, topp_seen = set(), set()
    for step in range(draws):
        counts[sample(logits, [SamplingParams(seed=9)], [step]).token_ids[0]] += 1
        topk_seen.add(sample(logits, [SamplingParams(seed=9, top_k=2)], [step]).token_ids[0])
        topp_seen.add(sample(logits, [SamplingParams(seed=9, top_p=0.7)], [step]).token_ids[0])
    assert torch.allclose(counts / draws, probs[0], atol=0.03)
    assert topk_seen == {0, 1}
    assert topp_seen == {0, 1}  # 0.5 < 0.7, so the nucleus needs the second token and no more


def test_stops_at_stop_and_eos_tokens() -> None:
    params = SamplingParams(stop_token_ids=(9,), eos_token_ids=(2,))
    assert params.stops_at(9) and params.stops_at(2) and not params.stops_at(3)
    assert not SamplingParams(ignore_eos=True, eos_token_ids=(2,)).stops_at(2)


def test_wire_form_round_trips_every_field() -> None:
    from common.messages import MessageError, Sampling, decode, encode
    from common.sampling import from_wire, to_wire

    params = SamplingParams(
        max_new_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=3,
        seed=11,
        stop_token_ids=(4, 5),
        ignore_eos=True,
        logprobs=2,
        logit_bias=((3, -1.5), (8, 2.0)),
        min_tokens=2,
        repetition_penalty=1.2,
        frequency_penalty=0.5,
        presence_penalty=-0.25,
        min_p=0.1,
        bad_words=((6,), (7, 8)),
        prompt_logprobs=3,
    )
    defaults = SamplingParams()
    unset = [f.name for f in dataclasses.fields(params) if getattr(params, f.name) == getattr(defaults, f.name)]
    assert unset == ["eos_token_ids"], "every field the wire carries is set here"
    wire = decode(encode(to_wire(params)), Sampling)
    assert from_wire(wire) == params
    with pytest.raises(MessageError, match="top_p"):  # the wire form checks the same ranges
        Sampling(max_new_tokens=1, top_p=0.0)
