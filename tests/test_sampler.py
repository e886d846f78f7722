"""Sampler and sampling-parameter behaviour."""
import math

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.sampler import _filter_top_k_top_p, sample
from engine.sampling_params import SamplingParams


def test_greedy_is_argmax_and_logprobs_are_of_chosen_token():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, -1.0]])
    toks, lps = sample(logits, [SamplingParams(logprobs=True), SamplingParams()], [None, None])
    assert toks == [1, 0]
    assert lps[0] == pytest.approx(torch.log_softmax(logits[0], -1)[1].item())


def test_top_k_and_top_p_masks():
    row = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert torch.isinf(_filter_top_k_top_p(row, 2, 1.0)).tolist() == [False, False, True, True]
    p = row.softmax(-1)  # ~[0.64, 0.24, 0.09, 0.03]
    kept = ~torch.isinf(_filter_top_k_top_p(row, -1, 0.8))
    assert kept.tolist() == [True, True, False, False]
    assert p[0] < 0.8 < p[0] + p[1]
    # top_p smaller than the top token's mass keeps just that token
    assert (~torch.isinf(_filter_top_k_top_p(row, -1, 0.1))).sum() == 1


def test_seeded_sampling_is_reproducible_and_batch_independent():
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=1.0, seed=123)] * 3

    def draw(rows):
        gens = [torch.Generator().manual_seed(123) for _ in rows]
        out = []
        for _ in range(20):
            t, _ = sample(logits[rows], [params[0]] * len(rows), gens)
            out.append(t)
        return out

    alone = [t[0] for t in draw([1])]
    batched = [t[1] for t in draw([0, 1, 2])]
    assert alone == batched
    assert len(set(alone)) > 1  # actually sampling, not argmax


def test_temperature_sampling_follows_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        t, _ = sample(logits, [SamplingParams(temperature=1.0)], [gen])
        counts[t[0]] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(seed=-1), "seed"),
    (dict(stop=[""]), "stop"),
    (dict(stop=["x"] * 17), "stop"),
    (dict(stop_token_ids=[10**9]), "stop_token_ids"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs).validate(vocab_size=1000)
    assert e.value.field == field and field in str(e.value)
