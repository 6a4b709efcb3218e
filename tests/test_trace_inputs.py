"""RoutingTrace on inputs from other processes and engines: pickling, wide unsigned ids, bounds.

Legend: T tokens, L MoE layers, K top-k slots.
"""

from __future__ import annotations

import copy
import io as stdio
import pickle

import numpy as np
import pytest
import torch

from routereplay import RoutingTrace
from routereplay.core.errors import (
    DuplicateExpertError,
    ExpertIdError,
    LayerIdsError,
    NumExpertsError,
    SeqlensError,
    TraceShapeError,
)
from routereplay.core.trace import MAX_NUM_EXPERTS, expert_dtype


def _trace(*, T=12, L=3, K=2, E=40, valid=True, gates=True, seed=0) -> RoutingTrace:
    g = torch.Generator().manual_seed(seed)
    experts_TLK = torch.rand(T, L, E, generator=g).argsort(-1)[..., :K]
    return RoutingTrace(
        experts=experts_TLK,
        cu_seqlens=[0, 5, 5, T],
        layer_ids=tuple(range(1, 2 * L, 2)),
        num_experts=E,
        valid=(torch.arange(T) % 5 != 4) if valid else None,
        gates=torch.rand(T, L, K, generator=g) if gates else None,
        meta={"source": "test", "model": "tiny"},
    )


_NUMPY = {torch.uint16: np.uint16, torch.uint32: np.uint32, torch.uint64: np.uint64}


# --- pickling -------------------------------------------------------------------------------
@pytest.mark.parametrize("valid", [False, True])
@pytest.mark.parametrize("gates", [False, True])
def test_pickle_round_trip_is_equal(valid, gates):
    trace = _trace(valid=valid, gates=gates)
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        back = pickle.loads(pickle.dumps(trace, protocol=protocol))
        assert back == trace
        assert back.experts.dtype == trace.experts.dtype == torch.uint8
        assert type(back.meta) is type(trace.meta) and dict(back.meta) == {"source": "test", "model": "tiny"}
        with pytest.raises(TypeError):
            back.meta["source"] = "x"  # still read-only after the trip
    assert copy.deepcopy(trace) == trace and copy.copy(trace) == trace


def test_pickle_skips_validation_and_carries_only_the_tensors(monkeypatch):
    trace = _trace(T=4096, L=4, K=4, E=64, gates=False)
    data = pickle.dumps(trace, protocol=pickle.HIGHEST_PROTOCOL)
    # The ids are uint8 [T, L, K]: the pickle is those bytes plus small change, no widened copy.
    assert trace.experts.nbytes <= len(data) < trace.nbytes + 4096
    # Unpickling trusts the bytes like a pickled tensor: no O(T) checks run.
    monkeypatch.setattr(RoutingTrace, "_checked_ids", lambda *a: pytest.fail("unpickling re-validated the ids"))
    assert pickle.loads(data) == trace


def test_pickle_of_a_view_does_not_carry_its_parent_storage():
    big = _trace(T=20000, L=2, K=2, E=16, valid=False, gates=False)
    # A trace built on a slice of a larger tensor keeps viewing the parent's storage.
    small = RoutingTrace(experts=big.experts[100:110], cu_seqlens=[0, 10], layer_ids=big.layer_ids, num_experts=16)
    assert small.experts.untyped_storage().nbytes() == big.experts.nbytes
    data = pickle.dumps(small, protocol=pickle.HIGHEST_PROTOCOL)
    assert len(data) < 2000, len(data)
    assert pickle.loads(data) == small


def test_trace_travels_through_a_multiprocessing_queue_pickler():
    # What a multiprocessing / torch.multiprocessing queue does to an object, without spawning.
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers the shared-memory tensor reductions)

    trace = _trace()
    buf = stdio.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(trace)
    back = pickle.loads(buf.getvalue())
    assert back == trace and back.experts.is_shared()


# --- wide unsigned ids (vLLM returns uint16 above 256 experts) ----------------------------
@pytest.mark.parametrize(
    ("dtype", "num_experts", "stored"),
    [
        (torch.uint16, 300, torch.int16),
        (torch.uint16, 200, torch.uint8),
        (torch.uint16, 2**16, torch.int32),
        (torch.uint32, 2**20, torch.int32),
        (torch.uint32, 64, torch.uint8),
        (torch.uint64, 1000, torch.int16),
    ],
)
def test_wide_unsigned_ids_are_accepted_and_stored_compactly(dtype, num_experts, stored):
    ids_TLK = torch.tensor([[[0, num_experts - 1]], [[num_experts // 2, 1]], [[7, 3]]], dtype=torch.int64)
    valid_T = torch.tensor([True, True, False])
    trace = RoutingTrace(
        experts=ids_TLK.to(dtype), cu_seqlens=[0, 3], layer_ids=(0,), num_experts=num_experts, valid=valid_T
    )
    assert trace.experts.dtype == stored == expert_dtype(num_experts)
    assert trace.experts.long()[:2].tolist() == ids_TLK[:2].tolist()
    assert trace.experts.long()[2].tolist() == [[0, 0]]  # invalid row re-zeroed


@pytest.mark.parametrize(
    ("dtype", "bad"),
    [(torch.uint16, 65535), (torch.uint32, 2**32 - 1), (torch.uint64, 2**64 - 1), (torch.uint64, 2**63)],
)
def test_wide_unsigned_id_out_of_range_names_its_real_value(dtype, bad):
    # numpy builds the unsigned values that torch's Python scalars cannot (above 2**63).
    ids_TLK = torch.from_numpy(np.array([[[1, 2]], [[3, bad]]], dtype=_NUMPY[dtype]))
    with pytest.raises(ExpertIdError) as e:
        RoutingTrace(experts=ids_TLK, cu_seqlens=[0, 1, 2], layer_ids=(5,), num_experts=300)
    assert str(e.value) == (
        f"expert id {bad} at row 1 (sequence 1, position 0), layer 5, slot 1 is outside [0, 300)"
    )


def test_wide_unsigned_duplicates_are_found():
    ids_TLK = torch.tensor([[[1, 2]], [[299, 299]]], dtype=torch.uint16)
    msg = r"^row 1 \(sequence 0, position 1\), layer 0 selects an expert twice: \[299, 299\]"
    with pytest.raises(DuplicateExpertError, match=msg):
        RoutingTrace(experts=ids_TLK, cu_seqlens=[0, 2], layer_ids=(0,), num_experts=300)


# --- num_experts bound -----------------------------------------------------------------------
def test_num_experts_bound_is_int32_storage():
    assert MAX_NUM_EXPERTS == 2**31
    assert expert_dtype(MAX_NUM_EXPERTS) == torch.int32
    # The largest id of the largest count fits int32 exactly: no wrap on storage.
    top = MAX_NUM_EXPERTS - 1
    trace = RoutingTrace(
        experts=torch.tensor([[[top, 0]]]), cu_seqlens=[0, 1], layer_ids=(0,), num_experts=MAX_NUM_EXPERTS
    )
    assert trace.experts.dtype == torch.int32 and trace.experts.tolist() == [[[top, 0]]]


@pytest.mark.parametrize("num_experts", [2**31 + 1, 2**32, 2**40])
def test_num_experts_above_the_bound_is_refused(num_experts):
    msg = (
        f"num_experts={num_experts} is above the largest count a trace can store, MAX_NUM_EXPERTS=2**31 "
        "(ids are stored as int32 at most); pass the router's real expert count"
    )
    with pytest.raises(NumExpertsError) as e:
        RoutingTrace(experts=torch.tensor([[[2**31, 0]]]), cu_seqlens=[0, 1], layer_ids=(0,), num_experts=num_experts)
    assert str(e.value) == msg
    with pytest.raises(NumExpertsError) as e:
        expert_dtype(num_experts)
    assert str(e.value) == msg


@pytest.mark.parametrize("num_experts", [0, -3, True, 8.0, "8"])
def test_num_experts_must_be_a_positive_int(num_experts):
    with pytest.raises(NumExpertsError, match=r"^num_experts must be a positive int, found ") as e:
        RoutingTrace(experts=torch.zeros(1, 1, 1, dtype=torch.int64), cu_seqlens=[0, 1], layer_ids=(0,),
                     num_experts=num_experts)
    assert isinstance(e.value, TraceShapeError)  # the class callers caught before


def test_int64_ids_above_int32_are_refused_not_wrapped():
    ids_TLK = torch.tensor([[[2**31 + 5, 1]]])  # would wrap to a small negative id in int32
    with pytest.raises(ExpertIdError, match=r"^expert id 2147483653 at row 0 .* is outside \[0, 2147483648\)$"):
        RoutingTrace(experts=ids_TLK, cu_seqlens=[0, 1], layer_ids=(0,), num_experts=MAX_NUM_EXPERTS)


# --- boundaries and layer ids: a few entries are checked as Python ints, many as tensors ------
def _cu(B: int, T: int) -> list[int]:
    """B sequences over T rows (T >= B), as cu_seqlens."""
    return [b * T // B for b in range(B)] + [T]


@pytest.mark.parametrize("B", [2, 3, 63, 64, 200])  # cu_seqlens of 64 entries and fewer: Python ints
@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda cu: [1, *cu[1:]], r"cu_seqlens must start at 0, found 1"),
        (lambda cu: [*cu[:-1], cu[-1] - 1], r"cu_seqlens must end at the number of tokens T=200, found 199"),
        (lambda cu: [*cu[:-2], cu[-1] + 1, cu[-1]], r"cu_seqlens must be non-decreasing: sequence \d+ has length -1"),
    ],
)
def test_bad_boundaries_are_refused_whatever_the_number_of_sequences(B, edit, message):
    experts_TLK = torch.arange(200 * 2).reshape(200, 1, 2) % 40
    RoutingTrace(experts=experts_TLK, cu_seqlens=_cu(B, 200), layer_ids=(0,), num_experts=40)
    with pytest.raises(SeqlensError, match=message):
        RoutingTrace(experts=experts_TLK, cu_seqlens=edit(_cu(B, 200)), layer_ids=(0,), num_experts=40)


@pytest.mark.parametrize(
    "layer_ids, message",
    [
        ((0, True, 2), r"layer_ids must be non-negative ints"),
        ((0, -1, 2), r"layer_ids must be non-negative ints"),
        ((0, np.int64(1), 2), r"layer_ids must be non-negative ints"),
        ((0, 1.0, 2), r"layer_ids must be non-negative ints"),
        ((0, 2, 2), r"layer_ids must be unique, layer\(s\) \[2\] appear more than once"),
        ((0, 1), r"experts has L=3 layers but layer_ids has 2"),
    ],
)
def test_bad_layer_ids_are_refused(layer_ids, message):
    experts_TLK = torch.arange(4 * 3 * 2).reshape(4, 3, 2) % 40
    with pytest.raises(LayerIdsError, match=message):
        RoutingTrace(experts=experts_TLK, cu_seqlens=[0, 4], layer_ids=layer_ids, num_experts=40)
    trace = RoutingTrace(experts=experts_TLK, cu_seqlens=[0, 4], layer_ids=torch.tensor([5, 1, 9]), num_experts=40)
    assert trace.layer_ids == (5, 1, 9) and all(type(i) is int for i in trace.layer_ids)
