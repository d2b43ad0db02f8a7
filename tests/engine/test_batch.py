"""ForwardBatch construction: flat token layout, per-sequence metadata; the vAttention backends' cache rows."""

import dataclasses

import pytest
import torch

from engine.attention.backend import slot_rows
from engine.batch import ForwardBatch

SEQS = [(3, [11, 12, 13], 0), (0, [21], 5), (1, [31, 32], 2)]  # prefill, decode, prefill chunk


def test_build_fields():
    b = ForwardBatch.build(SEQS, "cpu")
    assert b.input_ids.tolist() == [11, 12, 13, 21, 31, 32]
    assert b.positions.tolist() == [0, 1, 2, 5, 2, 3]
    assert b.slot_ids.tolist() == [3, 0, 1]
    assert b.query_lens.tolist() == [3, 1, 2]
    assert b.context_lens.tolist() == [0, 5, 2]
    assert b.seq_lens.tolist() == [3, 6, 4]
    assert b.cu_seqlens_q.tolist() == [0, 3, 4, 6]
    assert b.logits_indices.tolist() == [2, 3, 5]
    assert (b.max_query_len, b.max_seq_len, b.num_tokens, b.num_seqs) == (3, 6, 6, 3)
    assert b.cu_seqlens_q.dtype == b.seq_lens.dtype == torch.int32
    assert b.input_ids.dtype == b.positions.dtype == b.logits_indices.dtype == torch.int64
    assert (b.slot_ids_cpu, b.query_lens_cpu, b.context_lens_cpu, b.seq_lens_cpu, b.cu_seqlens_q_cpu) == (
        [3, 0, 1],
        [3, 1, 2],
        [0, 5, 2],
        [3, 6, 4],
        [0, 3, 4, 6],
    )
    assert not b.is_decode_only and b.positions_cpu.tolist() == [0, 1, 2, 5, 2, 3]
    assert b.num_leading_decodes == 0  # the decode row comes after a prefill chunk


def test_leading_decodes_are_counted_up_to_the_first_chunk():
    b = ForwardBatch.build([(1, [4], 9), (2, [5], 3), (3, [6, 7], 0), (4, [8], 2)], "cpu")
    assert b.num_leading_decodes == 2
    assert ForwardBatch.build([(1, [4], 9), (2, [5], 3)], "cpu").num_leading_decodes == 2


def test_slot_rows():
    rows = slot_rows(ForwardBatch.build(SEQS, "cpu"), 100)
    assert rows.slot_mapping.tolist() == [300, 301, 302, 5, 102, 103] and rows.slot_mapping.dtype == torch.int64
    assert rows.kv_start_rows.tolist() == [300, 0, 100, 0] and rows.kv_start_rows.dtype == torch.int32
    with pytest.raises(ValueError, match="slot_stride_tokens"):
        slot_rows(ForwardBatch.build(SEQS, "cpu"), 0)


def test_decode_only_rows_come_from_the_device_tensors():
    """A CUDA graph's static batch has placeholder host lists: a decode batch's rows are read from its device
    tensors only."""
    b = ForwardBatch.build([(0, [1], 7), (4, [2], 0)], "cpu")
    assert b.is_decode_only and b.positions.tolist() == [7, 0]
    rows = slot_rows(b, 16)
    assert rows.slot_mapping.tolist() == [7, 64] and rows.kv_start_rows.tolist() == [0, 64, 0]
    b.slot_ids_cpu[:] = [9, 9]  # placeholders, as the graph runner's
    assert slot_rows(b, 16).slot_mapping.tolist() == [7, 64]


def test_a_batch_of_chunks_without_host_positions_is_refused():
    with pytest.raises(ValueError, match="host positions"):
        slot_rows(dataclasses.replace(ForwardBatch.build(SEQS, "cpu"), positions_cpu=None), 100)


@pytest.mark.parametrize(
    "seqs,match",
    [
        ([], "at least one"),
        ([(0, [], 0)], "token_ids"),
        ([(0, [1], -1)], "start_pos"),
        ([(-1, [1], 0)], "slot"),
        ([(2, [1], 0), (2, [5], 3)], "distinct"),
    ],
)
def test_build_rejects_bad_input(seqs, match):
    with pytest.raises(ValueError, match=match):
        ForwardBatch.build(seqs, "cpu")


@pytest.mark.gpu
def test_build_on_gpu():
    b = ForwardBatch.build(SEQS, "cuda")
    rows = slot_rows(b, 100)
    assert b.input_ids.is_cuda and rows.slot_mapping.is_cuda and rows.kv_start_rows.is_cuda
    assert b.positions.tolist() == [0, 1, 2, 5, 2, 3] and rows.slot_mapping.tolist() == [300, 301, 302, 5, 102, 103]
