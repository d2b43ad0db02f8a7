"""bench_load's parity verdict in bf16: the engine is judged against the float32 logits of the same weights,
relative to transformers' own bf16 error from them."""

import pytest
import torch

from benchmarks.bench_load import compare


def _outputs(last_logits: torch.Tensor) -> dict:
    tokens = [[1, 2]] * last_logits.shape[0]
    return {"last_logits": last_logits, "greedy": tokens, "at_greedy": [torch.zeros(2, 8)] * last_logits.shape[0]}


@pytest.mark.parametrize("engine_error,passes", [(0.9, True), (1.4, True), (2.0, False)])
def test_bf16_logits_pass_when_no_further_from_float32_than_transformers_bf16(engine_error, passes):
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(3, 8, generator=g)
    noise = torch.randn(3, 8, generator=g)
    noise = noise / noise.norm(dim=1, keepdim=True) * exact.norm(dim=1, keepdim=True) * 0.05  # 5% error
    hf = exact + noise
    ours = exact - engine_error * noise  # on the other side: 0.05 * (1 + engine_error) from transformers
    verdict = compare(_outputs(ours), _outputs(hf), "bfloat16", _outputs(exact))
    assert verdict["fp32_rel_l2_engine"] == pytest.approx([0.05 * engine_error] * 3, rel=1e-4)
    assert verdict["logits_rel_l2_max"] > 0.05  # a fixed 0.05 bound against transformers would fail every case
    assert verdict["pass"] is passes


def test_bf16_needs_the_float32_reference():
    logits = torch.zeros(1, 8)
    with pytest.raises(ValueError, match="float32 reference"):
        compare(_outputs(logits), _outputs(logits), "bfloat16")
