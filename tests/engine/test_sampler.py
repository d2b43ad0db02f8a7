import math

import pytest
import torch

from engine.sampler import Sampler
from engine.sampling_params import SamplingParams

VOCAB = 1000


def make_logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, VOCAB, generator=g) * 3.0


def sample(sampler, logits, params, histories=None, generators=None):
    n = logits.shape[0]
    params = params if isinstance(params, list) else [params] * n
    histories = histories or [[] for _ in range(n)]
    generators = generators or [None] * n
    return sampler(logits, params, histories, generators)


def test_greedy_is_argmax():
    logits = make_logits(8)
    out = sample(Sampler(seed=0), logits, SamplingParams(temperature=0.0))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8


def test_top_k_one_is_greedy_even_at_high_temperature():
    logits = make_logits(16, seed=1)
    out = sample(Sampler(seed=0), logits, SamplingParams(temperature=2.0, top_k=1))
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_samples_only_within_the_k_most_likely():
    row = make_logits(1, seed=2)
    logits = row.expand(2000, VOCAB).contiguous()
    out = sample(Sampler(seed=0), logits, SamplingParams(temperature=1.5, top_k=5))
    allowed = set(torch.topk(row[0], 5).indices.tolist())
    assert set(out.token_ids) <= allowed
    assert len(set(out.token_ids)) == 5  # high temperature over 2000 draws reaches every kept token


def test_top_p_samples_only_within_the_nucleus():
    row = torch.full((VOCAB,), -10.0)
    row[:4] = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    logits = row.expand(3000, VOCAB).contiguous()
    out = sample(Sampler(seed=0), logits, SamplingParams(temperature=1.0, top_p=0.7))
    # Nucleus of mass 0.7: tokens 0 and 1 (0.5 < 0.7, 0.8 >= 0.7); renormalized 5/8 and 3/8.
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=VOCAB)
    assert counts[2:].sum() == 0
    assert abs(counts[0].item() / 3000 - 0.625) < 0.04


def test_temperature_sampling_matches_softmax_distribution():
    row = torch.tensor([2.0, 1.0, 0.0, -1.0] + [-30.0] * (VOCAB - 4))
    logits = row.expand(8000, VOCAB).contiguous()
    temperature = 0.7
    out = sample(Sampler(seed=123), logits, SamplingParams(temperature=temperature))
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=VOCAB)[:4].float() / 8000
    expected = torch.softmax(row[:4] / temperature, dim=-1)
    assert torch.allclose(freq, expected, atol=0.02), (freq, expected)


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    logits = make_logits(6, seed=3)
    params = SamplingParams(temperature=1.0, seed=42)

    def run(batch_rows, seeded_index):
        tokens = []
        generator = torch.Generator().manual_seed(42)
        sampler = Sampler(seed=len(batch_rows))  # different engine-wide randomness each run
        for _ in range(10):
            rows = logits[batch_rows]
            ps = [SamplingParams(temperature=1.0)] * len(batch_rows)
            ps[seeded_index] = params
            gens = [None] * len(batch_rows)
            gens[seeded_index] = generator
            tokens.append(sampler(rows, ps, [[]] * len(batch_rows), gens).token_ids[seeded_index])
        return tokens

    alone = run([0], 0)
    in_batch = run([1, 2, 0, 4, 5], 2)
    assert alone == in_batch
    assert len(set(alone)) > 1  # it really samples


def test_frequency_and_presence_penalties():
    logits = torch.zeros(1, VOCAB)
    logits[0, 7] = 1.0
    logits[0, 8] = 0.9
    greedy_penalized = SamplingParams(temperature=0.0, frequency_penalty=0.2)
    assert sample(Sampler(), logits, greedy_penalized, [[7]]).token_ids == [8]
    assert sample(Sampler(), logits, greedy_penalized, [[8, 8]]).token_ids == [7]
    # Presence counts once: two 7s with presence 0.05 still leave 7 ahead of 8 (0.95 > 0.9).
    presence = SamplingParams(temperature=0.0, presence_penalty=0.05)
    assert sample(Sampler(), logits, presence, [[7, 7]]).token_ids == [7]
    # Negative penalties favour repeats.
    favour = SamplingParams(temperature=0.0, frequency_penalty=-1.0)
    assert sample(Sampler(), logits, favour, [[3]]).token_ids == [3]
    # The input logits are left untouched.
    assert logits[0, 7] == 1.0


def test_logprobs_are_raw_log_softmax_with_sorted_alternatives():
    logits = make_logits(3, seed=4)
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, logprobs=0),
    ]
    out = sample(Sampler(seed=0), logits, params)
    expected = torch.log_softmax(logits, dim=-1)
    first = out.logprobs[0]
    assert first["token_id"] == out.token_ids[0]
    assert math.isclose(first["logprob"], expected[0, out.token_ids[0]].item(), rel_tol=1e-5)
    top_ids = [t for t, _ in first["top"]]
    assert top_ids == torch.topk(expected[0], 5).indices.tolist()
    assert [lp for _, lp in first["top"]] == sorted([lp for _, lp in first["top"]], reverse=True)
    assert out.logprobs[1] is None
    assert out.logprobs[2]["top"] == []
    assert math.isclose(out.logprobs[2]["logprob"], expected[2, out.token_ids[2]].item(), rel_tol=1e-5)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        Sampler()(make_logits(2), [SamplingParams()], [[]], [None])
