"""Sampler and sampling-parameter behaviour."""
import math

import pytest
import torch

from engine.errors import InvalidRequestError
from engine import sampler
from engine.sampler import filter_rows, inverse_cdf, sample, sample_on_device
from engine.sampling_params import SamplingParams


def test_greedy_is_argmax_and_logprobs_are_of_chosen_token():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, -1.0]])
    toks, lps = sample(logits, [SamplingParams(logprobs=True), SamplingParams()], [None, None])
    assert toks == [1, 0]
    assert lps[0] == pytest.approx(torch.log_softmax(logits[0], -1)[1].item())


@pytest.fixture(params=["inverse_cdf", "race"])
def draw(request, monkeypatch):
    """Runs a test under each draw: the CPU's (inverse CDF) and the one other devices use
    (the exponential race), which is plain torch and runs on a CPU as well."""
    if request.param == "race":
        monkeypatch.setattr(sampler, "_draw_inverse_cdf", sampler._draw_race)
    return request.param


def _keep(row, k, p):
    """The filters' rule written out plainly, in float64: top-k keeps the logits >= the
    k-th largest; top-p then keeps a token when the mass of the tokens with a strictly
    larger logit is below p."""
    x = row.double()
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < k < x.numel():
        keep &= x >= torch.sort(x, descending=True).values[k - 1]
    if p < 1.0:
        probs = x.masked_fill(~keep, float("-inf")).softmax(-1)
        keep &= torch.tensor([float(probs[x > v].sum()) < p for v in x.tolist()])
    return keep


def _kept(row, k, p):
    return ~torch.isinf(filter_rows(row[None], [k], [p])[0])


def test_top_k_and_top_p_masks():
    row = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert _kept(row, 2, 1.0).tolist() == [True, True, False, False]
    p = row.softmax(-1)  # ~[0.64, 0.24, 0.09, 0.03]
    assert _kept(row, -1, 0.8).tolist() == [True, True, False, False]
    assert p[0] < 0.8 < p[0] + p[1]
    # top_p smaller than the top token's mass keeps just that token
    assert _kept(row, -1, 0.1).sum() == 1
    # ties with the last kept logit are kept (by value, not by a sort's order)
    tied = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0])
    assert _kept(tied, 2, 1.0).tolist() == [True, True, True, True, False]
    assert _kept(tied, -1, 0.8).tolist() == [True, True, True, True, False]   # 0.69 ahead of each 1


@pytest.mark.parametrize("widths", [None, (4, 16)])
def test_batched_filter_masks_each_row_by_its_own_settings(widths, monkeypatch):
    """Against the rule written out, row by row; (4, 16) makes the CPU's nucleus search
    fall back from a short prefix to a longer one and to the whole sorted row."""
    if widths:
        monkeypatch.setattr(sampler, "CPU_PREFIX_WIDTHS", widths)
    g = torch.Generator().manual_seed(5)
    V = 97
    settings = [(-1, 1.0), (1, 1.0), (7, 1.0), (V, 1.0), (V - 1, 1.0), (-1, 0.5), (-1, 0.01),
                (5, 0.9), (40, 0.3), (-1, 0.999), (3, 0.2), (-1, 0.95), (30, 0.99)]
    for trial in range(30):
        picked = [settings[int(i)] for i in torch.randint(len(settings), (12,), generator=g)]
        # From peaked to nearly flat rows (a flat row's nucleus is most of the vocabulary).
        logits = torch.randn(len(picked), V, generator=g) * (4.0 / (1 + trial))
        if trial % 3 == 0:   # ties
            logits[0, :10] = logits[0, 0]
            logits[1] = torch.randint(0, 4, (V,), generator=g).float()
        got = filter_rows(logits, [k for k, _ in picked], [p for _, p in picked])
        for r, (k, p) in enumerate(picked):
            keep = _keep(logits[r], k, p)
            assert torch.equal(~torch.isinf(got[r]), keep), (trial, r, k, p)
            assert torch.equal(got[r][keep], logits[r][keep])


def test_top_p_keeps_its_precision_at_low_temperatures():
    """Logits divided by a small temperature are large: the masses must still come out to
    fp32 precision (relative to the row's peak), not to the rounding of a large logsumexp."""
    # 30 and 29.99955 at temperature 1e-4: masses 0.98901 and 0.01099, so 0.995 keeps both.
    assert _kept(torch.tensor([30.0, 29.99955]) / 1e-4, -1, 0.995).tolist() == [True, True]
    g = torch.Generator().manual_seed(8)
    for scale in (1e3, 1e5, 3e5):
        peak = scale * (1 + torch.rand(16, 1, generator=g))
        logits = peak - torch.rand(16, 300, generator=g) * 12   # spread of a few units below it
        ps = [0.5, 0.9, 0.99, 0.999] * 4
        got = filter_rows(logits, [-1] * 16, ps)
        for r in range(16):
            assert torch.equal(~torch.isinf(got[r]), _keep_sorted(logits[r], -1, ps[r])), (scale, r)


def test_temperatures_too_small_for_fp32_sample_greedily():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)) * 5
    for t in (1e-50, 1e-7):
        assert SamplingParams(temperature=t).greedy
        toks, _ = sample(logits, [SamplingParams(temperature=t, seed=1)] * 3, [torch.Generator().manual_seed(1)] * 3)
        assert toks == logits.argmax(-1).tolist()
    assert not SamplingParams(temperature=1e-4).greedy


def test_nucleus_search_over_a_large_vocabulary_falls_back_where_the_prefix_is_short():
    g = torch.Generator().manual_seed(1)
    V = 5000
    logits = torch.cat([torch.randn(2, V, generator=g) * 8,     # peaked: a short nucleus
                        torch.randn(2, V, generator=g) * 0.1])  # flat: past every prefix
    got = filter_rows(logits, [-1, 50, -1, 3000], [0.9, 0.95, 0.9, 0.95])
    kept = (~torch.isinf(got)).sum(-1).tolist()
    assert kept[0] < 256 and kept[2] > 2048 and kept[3] <= 3000
    for r, (k, p) in enumerate([(-1, 0.9), (50, 0.95), (-1, 0.9), (3000, 0.95)]):
        assert torch.equal(~torch.isinf(got[r]), _keep_sorted(logits[r], k, p)), r


def _keep_sorted(row, k, p):
    # _keep's rule in O(V log V), for vocabularies too large for its quadratic form.
    x = row.double()
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < k < x.numel():
        keep &= x >= torch.sort(x, descending=True).values[k - 1]
    probs = x.masked_fill(~keep, float("-inf")).softmax(-1)
    vals, order = torch.sort(x.masked_fill(~keep, float("-inf")), descending=True)
    before = torch.cumsum(probs[order], 0) - probs[order]
    m = int((before < p).sum()) - 1
    return keep & (x >= vals[m])


def test_the_race_never_draws_a_token_of_probability_zero(monkeypatch):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 5000, generator=g) * 4
    logits[torch.rand(64, 5000, generator=g) < 0.98] = float("-inf")
    probs = logits.softmax(-1)
    for _ in range(5):
        assert (probs.gather(-1, sampler._draw_race(probs, [None] * 64)[:, None]) > 0).all()
    # Even where the noise comes out 0 (clamped, not divided by).
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, **kw: self.zero_())
    assert (probs.gather(-1, sampler._draw_race(probs, [None] * 64)[:, None]) > 0).all()


def test_inverse_cdf_never_draws_a_token_of_probability_zero():
    probs = torch.tensor([[0.0, 0.0, 0.25, 0.0, 0.75, 0.0, 0.0]] * 4 + [[1.0, 0, 0, 0, 0, 0, 0]])
    u = torch.tensor([[0.0], [0.2499], [0.25], [1 - 2 ** -24], [1 - 2 ** -24]])
    assert inverse_cdf(probs, u).tolist() == [2, 2, 4, 4, 0]
    # Many rows of a large vocabulary, most of it masked, at the ends of [0, 1) and between.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 50000, generator=g) * 4
    logits[torch.rand(64, 50000, generator=g) < 0.98] = float("-inf")
    probs = logits.softmax(-1)
    for u in (torch.zeros(64, 1), torch.full((64, 1), 1 - 2 ** -24), torch.rand(64, 1, generator=g)):
        drawn = inverse_cdf(probs, u)
        assert (probs.gather(-1, drawn[:, None]) > 0).all()


def test_seeded_sampling_is_reproducible_and_batch_independent(draw):
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


def test_temperature_sampling_follows_distribution(draw):
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        t, _ = sample(logits, [SamplingParams(temperature=1.0)], [gen])
        counts[t[0]] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch(draw):
    g = torch.Generator().manual_seed(9)
    V = 300
    mine = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=11)
    others = [SamplingParams(), SamplingParams(temperature=1.3, top_k=5), SamplingParams(temperature=1.0, top_p=0.6),
              SamplingParams(temperature=0.7, seed=3)]
    logits = torch.randn(20, V, generator=g)

    def draws(batch_params, where):
        gens = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in batch_params]
        rows = torch.randn(len(batch_params), V, generator=g)
        out = []
        for step in range(20):
            rows[where] = logits[step]
            out.append(sample(rows, batch_params, gens)[0][where])
        return out

    alone = draws([mine], 0)
    assert len(set(alone)) > 1
    assert draws(others[:2] + [mine] + others[2:], 2) == alone
    assert draws([mine] + others, 0) == alone


@pytest.mark.parametrize("with_seeded_row", [False, True])
def test_unseeded_rows_drawn_as_one_batch_follow_their_own_distributions(with_seeded_row, draw):
    torch.manual_seed(0)
    n = 4000
    base = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kinds = [(SamplingParams(temperature=1.0), [0.5, 0.3, 0.15, 0.05]),
             (SamplingParams(temperature=1.0, top_k=2), [0.625, 0.375, 0.0, 0.0]),
             (SamplingParams(temperature=1.0, top_p=0.7), [0.625, 0.375, 0.0, 0.0]),
             (SamplingParams(), [1.0, 0.0, 0.0, 0.0])]
    params = [kinds[i % 4][0] for i in range(n)]
    logits = base.repeat(n, 1)
    # A greedy row's logits are changed so a mixed-up row order would show.
    logits[3::4] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    generators = [None] * n
    if with_seeded_row:   # the unseeded rows are then drawn apart from the seeded one
        params.append(SamplingParams(temperature=1.0, seed=7))
        logits = torch.cat([logits, base[None]])
        generators.append(torch.Generator().manual_seed(7))
    tokens, _ = sample_on_device(logits, params, generators)
    tokens = tokens[:n]
    for j, (_, want) in enumerate(kinds[:3]):
        freq = torch.bincount(tokens[j::4], minlength=4).float() / (n // 4)
        assert torch.allclose(freq, torch.tensor(want), atol=0.05), (j, freq)
    assert (tokens[3::4] == 3).all()


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
