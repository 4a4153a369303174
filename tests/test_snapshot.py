"""Tests for ckptio.snapshot: skeleton + buffers round trips, sharing, caller safety and buffer reuse."""

from __future__ import annotations

import copy
import json
import math
import os
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from helpers import FakeCuda, FakeCudaTensor, assert_same
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptio.shm import ALIGNMENT, Segment, shared_staging, tensor_views
from ckptio.snapshot import BufferSlot, heap_staging, rebuild, state_shape, walk_tensors

# -- helpers ---------------------------------------------------------------------------------------------------




def json_roundtrip(state: Any) -> tuple[Any, Any]:
    """Snapshot ``state``, send the skeleton through strict JSON (as safetensors metadata does), rebuild."""
    snapshot = BufferSlot().take(state)
    skeleton = json.loads(json.dumps(snapshot.skeleton, allow_nan=False))
    return rebuild(skeleton, snapshot.tensors), snapshot


def training_state() -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return {
        "epoch": 2,
        "batch": 100,
        "loss": 0.25,
        "best": float("inf"),
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "rng_state": torch.get_rng_state(),
        "note": None,
    }


# -- round trips -----------------------------------------------------------------------------------------------


def test_typical_training_state_rebuilds_to_an_equal_structure() -> None:
    torch.manual_seed(0)
    state = training_state()
    rebuilt, _ = json_roundtrip(state)
    assert_same(rebuilt, state)
    assert type(rebuilt["model_state_dict"]) is OrderedDict
    assert list(rebuilt["optimizer_state_dict"]["state"]) == [0, 1, 2, 3]
    assert rebuilt["optimizer_state_dict"]["param_groups"][0]["betas"] == (0.9, 0.999)


def test_skeleton_is_strict_json_even_with_nan_and_infinite_floats() -> None:
    state = {"a": float("nan"), "b": [float("inf"), float("-inf")], "c": -0.0, 7: (1, "x", None, True)}
    snapshot = BufferSlot().take(state)
    json.dumps(snapshot.skeleton, allow_nan=False)  # must not raise
    rebuilt, _ = json_roundtrip(state)
    assert_same(rebuilt, state)


@pytest.mark.parametrize(
    "state",
    [
        torch.arange(3),
        [torch.ones(2), 1, "a"],
        (torch.zeros(()),),
        OrderedDict(),
        {},
        [],
        (),
        {"": torch.ones(1), "nested": {"": [torch.ones(2)]}},
        {1: "int key", "1": "str key", -4: {0: [()]}},
        {"big": 2**100, "neg": -(2**70), "flag": False, "one": 1, "true": True},
    ],
    ids=["bare-tensor", "list", "tuple", "empty-ordered", "empty-dict", "empty-list", "empty-tuple",
         "empty-keys", "int-and-str-keys", "big-ints-and-bools"],
)
def test_edge_case_states_round_trip(state) -> None:
    rebuilt, _ = json_roundtrip(state)
    assert_same(rebuilt, state)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]
SHAPES = [(), (0,), (3,), (2, 3), (0, 4), (1, 1, 2)]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, -0.0]


@st.composite
def tensors(draw: Any) -> torch.Tensor:
    """Random bit patterns of every dtype (so NaNs with payloads too), 0-dim and empty shapes, some transposed."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from(SHAPES))
    seed = draw(st.integers(0, 2**31 - 1))
    count = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (count * itemsize,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    tensor = (raw % 2).view(torch.bool) if dtype is torch.bool else raw.view(dtype)
    tensor = tensor.reshape(shape)
    if dtype.is_floating_point and count and draw(st.booleans()):
        tensor.view(-1)[0] = draw(st.sampled_from(SPECIAL_FLOATS))
    if tensor.dim() == 2 and draw(st.booleans()):
        tensor = tensor.t()
    return tensor


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
keys = st.one_of(st.integers(-3, 10**6), st.text(max_size=6))
states = st.recursive(
    st.one_of(scalars, tensors()),
    lambda children: st.one_of(
        st.dictionaries(keys, children, max_size=4),
        st.dictionaries(keys, children, max_size=4).map(OrderedDict),
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(states)
def test_any_nested_state_rebuilds_to_an_equal_structure(state) -> None:
    before = copy.deepcopy(state)
    rebuilt, snapshot = json_roundtrip(state)
    assert_same(rebuilt, state)
    assert_same(state, before)  # the caller's structure is untouched
    for buffer, source in zip(snapshot.tensors, walk_tensors(state), strict=False):
        assert buffer.is_contiguous()
        if source.numel():
            assert buffer.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()


# -- sharing, views and layout ---------------------------------------------------------------------------------


def test_the_same_tensor_twice_is_copied_once_and_rebuilt_in_both_places() -> None:
    weight = torch.randn(3, 2)
    state = {"encoder": {"weight": weight}, "decoder": {"weight": weight}, "list": [weight]}
    rebuilt, snapshot = json_roundtrip(state)
    assert len(snapshot.tensors) == 1
    assert snapshot.names == ["encoder/weight"]
    assert rebuilt["encoder"]["weight"] is rebuilt["decoder"]["weight"] is rebuilt["list"][0]
    assert_same(rebuilt, state)


def test_views_of_one_storage_keep_their_own_values() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "base": base,
        "row": base[1],
        "column": base[:, 2],
        "transposed": base.t(),
        "strided": base[::2, ::3],
        "offset_flat": base.view(-1)[5:11],
        "reinterpreted": base.view(torch.int32),
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
    }
    rebuilt, snapshot = json_roundtrip(state)
    assert_same(rebuilt, {k: v.contiguous() for k, v in state.items()})
    assert len(snapshot.tensors) == len(state)
    assert all(t.is_contiguous() for t in snapshot.tensors)


def test_a_conjugate_view_is_not_mistaken_for_its_base() -> None:
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    rebuilt, _ = json_roundtrip({"z": z, "z_conj": z.conj()})
    assert torch.equal(rebuilt["z"], z)
    assert torch.equal(rebuilt["z_conj"].resolve_conj(), z.conj().resolve_conj())


def test_non_contiguous_tensor_is_stored_with_its_logical_values() -> None:
    source = torch.randn(5, 7).t()[1:, ::2]
    assert not source.is_contiguous()
    rebuilt, _ = json_roundtrip({"x": source})
    assert torch.equal(rebuilt["x"], source)
    assert rebuilt["x"].shape == source.shape


def test_distinct_empty_tensors_rebuild_with_their_own_shapes_and_dtypes() -> None:
    state = {"a": torch.empty(0), "b": torch.empty(0), "c": torch.empty(0, 3), "d": torch.empty(0, dtype=torch.int8)}
    rebuilt, _ = json_roundtrip(state)
    assert_same(rebuilt, state)


def test_parameters_are_snapshotted_as_copies_and_rebuilt_as_parameters_as_torch_save_keeps_them() -> None:
    param, frozen = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2), requires_grad=False)
    rebuilt, _ = json_roundtrip({"p": param, "f": frozen, "plain": torch.ones(1)})
    assert type(rebuilt["p"]) is torch.nn.Parameter and rebuilt["p"].requires_grad
    assert type(rebuilt["f"]) is torch.nn.Parameter and not rebuilt["f"].requires_grad
    assert type(rebuilt["plain"]) is torch.Tensor
    assert torch.equal(rebuilt["p"], param.detach())
    assert rebuilt["p"].untyped_storage().data_ptr() != param.untyped_storage().data_ptr()


# -- caller safety ---------------------------------------------------------------------------------------------


def test_mutating_the_callers_tensors_after_the_snapshot_does_not_change_it() -> None:
    weight = torch.randn(4, 4)
    expected = weight.clone()
    state = {"w": weight, "steps": [torch.tensor(3)]}
    snapshot = BufferSlot().take(state)
    weight.add_(1.0)
    state["steps"][0].fill_(99)
    state["w"] = torch.zeros(1)
    rebuilt = snapshot.materialize()
    assert torch.equal(rebuilt["w"], expected)
    assert rebuilt["steps"][0].item() == 3


def test_taking_a_snapshot_never_mutates_the_callers_containers() -> None:
    torch.manual_seed(1)
    state = training_state()
    state["extras"] = OrderedDict(a=[1, 2, (3, 4)], b={0: "x"})
    before = copy.deepcopy(state)
    identities = {key: id(value) for key, value in state.items()}
    inner = state["optimizer_state_dict"]["state"]
    BufferSlot().take(state)
    assert_same(state, before)
    assert {key: id(value) for key, value in state.items()} == identities
    assert state["optimizer_state_dict"]["state"] is inner


# -- buffer reuse ----------------------------------------------------------------------------------------------


def test_the_next_snapshot_of_the_same_shapes_reuses_the_same_buffers() -> None:
    slot = BufferSlot()
    state = {"a": torch.randn(8, 8), "b": torch.arange(10), "c": [torch.ones(3, dtype=torch.bfloat16)]}
    first = slot.take(state)
    buffers = list(first.tensors)
    pointers = [t.data_ptr() for t in buffers]
    for step in range(5):
        state["a"].add_(1.0)
        later = slot.take(state)
        assert all(a is b for a, b in zip(later.tensors, buffers, strict=True)), f"step {step}"
        assert [t.data_ptr() for t in later.tensors] == pointers
        assert torch.equal(later.tensors[0], state["a"])
    assert slot.nbytes == 8 * 8 * 4 + 10 * 8 + 3 * 2


def test_a_tensor_that_changes_shape_or_dtype_gets_a_new_buffer_and_the_others_are_kept() -> None:
    slot = BufferSlot()
    first = slot.take([torch.zeros(4), torch.zeros(2, 2), torch.zeros(3)])
    kept_first, kept_last = first.tensors[0], first.tensors[2]
    second = slot.take([torch.ones(4), torch.ones(5), torch.ones(3, dtype=torch.float64)])
    assert second.tensors[0] is kept_first
    assert second.tensors[1].shape == (5,)
    assert second.tensors[2] is not kept_last and second.tensors[2].dtype == torch.float64
    assert torch.equal(second.tensors[1], torch.ones(5))


def test_a_smaller_state_shrinks_the_slot() -> None:
    slot = BufferSlot()
    slot.take([torch.zeros(100) for _ in range(4)])
    assert len(slot.buffers) == 4
    snapshot = slot.take([torch.zeros(100)])
    assert len(slot.buffers) == 1
    assert len(snapshot.tensors) == 1
    assert slot.nbytes == 400


def test_a_slot_adopts_buffers_prepared_for_its_layout_and_ignores_others() -> None:
    state = {"a": torch.randn(6, 2), "b": [torch.arange(4)]}
    slot = BufferSlot()
    slot.offer(heap_staging(state_shape({"x": torch.zeros(3)}), True))  # another layout: not used
    first = slot.take(state)
    assert slot.prepared is not None and all(t.data_ptr() != 0 for t in first.tensors)
    prepared = heap_staging(state_shape(state), True)
    slot.offer(prepared)
    second = slot.take(state)
    assert slot.prepared is None and slot.staging is prepared
    assert [t.data_ptr() for t in second.tensors] == [t.data_ptr() for t in prepared.buffers]
    assert_same(rebuild(second.skeleton, second.tensors), state)
    assert not slot.needs_prepare  # CPU sources: nothing to pin


def test_a_shared_segment_holds_every_tensor_of_a_slot_aligned_and_the_snapshot_copies_into_it() -> None:
    state = {"w": torch.randn(5, 3), "flags": torch.tensor([True, False, True]), "empty": torch.zeros(0, 2),
             "half": torch.ones(7, dtype=torch.float16), "z": torch.tensor([1 + 2j])}
    slot = BufferSlot(allocator=lambda layout, prepared: shared_staging(layout, prepared, key="t"))
    snapshot = slot.take(state)
    segment = snapshot.segment
    assert segment is not None and segment.fd >= 0 and segment.key == "t"
    base = segment.address()
    for tensor, (offset, _, shape) in zip(snapshot.tensors, segment.tensor_map, strict=True):
        assert tuple(tensor.shape) == shape and offset % ALIGNMENT == 0
        if tensor.numel():
            assert tensor.data_ptr() == base + offset
    assert_same(rebuild(snapshot.skeleton, snapshot.tensors), state)
    # what the writer process does with the descriptor it receives: the same bytes, through its own mapping
    other = Segment.attach(os.dup(segment.fd), segment.size, key="t", serial=segment.serial,
                           tensor_map=segment.tensor_map)
    assert_same(rebuild(snapshot.skeleton, tensor_views(other.buffer, other.tensor_map)), state)
    again = slot.take(state)
    assert again.segment is segment  # the same layout reuses the segment
    slot.take({"w": torch.randn(2)})
    assert slot.staging is not None and slot.staging.segment is not segment and segment.fd == -1


def test_snapshot_counts_elements_and_bytes_and_summarises_top_level_scalars() -> None:
    state = {
        "epoch": 3,
        "loss": float("nan"),
        "tag": "run-a",
        "long": "x" * 500,
        "model_state_dict": {"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.float64)},
        "lr": [0.1],
    }
    snapshot = BufferSlot().take(state)
    assert snapshot.element_count == 9
    assert snapshot.tensor_bytes == 6 * 4 + 3 * 8
    assert snapshot.model_elements == 9
    assert snapshot.summary == {"epoch": 3, "loss": "nan", "tag": "run-a"}
    assert snapshot.names == ["model_state_dict/w", "model_state_dict/b"]


# -- unsupported input -----------------------------------------------------------------------------------------


class _Custom:
    pass


@pytest.mark.parametrize(
    ("leaf", "type_name"),
    [
        ({1, 2}, "builtins.set"),
        (np.zeros(3), "numpy.ndarray"),
        (_Custom(), "_Custom"),
        (b"bytes", "builtins.bytes"),
        (frozenset(), "builtins.frozenset"),
    ],
    ids=["set", "numpy", "custom-object", "bytes", "frozenset"],
)
def test_unsupported_leaf_raises_value_error_naming_the_key_path_and_the_fix(leaf, type_name) -> None:
    state = {"optimizer": {"state": {0: {"extra": [1, leaf]}}}}
    with pytest.raises(ValueError, match="optimizer/state/0/extra/1") as info:
        BufferSlot().take(state)
    assert type_name in str(info.value)
    assert "convert it to a tensor, a Python scalar, or a dict/list/tuple" in str(info.value)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_tensor_raises_value_error_naming_the_key_path_and_to_dense() -> None:
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(ValueError, match=r"model/embedding is a torch\.sparse_coo tensor.*\.to_dense\(\)"):
        BufferSlot().take({"model": {"embedding": sparse}})
    csr = torch.eye(3).to_sparse_csr()
    with pytest.raises(ValueError, match=r"layers/0 is a torch\.sparse_csr tensor.*to_dense"):
        BufferSlot().take({"layers": [csr]})


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quantized_tensor_raises_value_error_suggesting_dequantize() -> None:
    quantized = torch.quantize_per_tensor(torch.randn(4), scale=0.1, zero_point=0, dtype=torch.qint8)
    with pytest.raises(ValueError, match=r"q is a quantized tensor.*dequantize"):
        BufferSlot().take({"q": quantized})


def test_unsupported_key_type_raises_value_error_naming_the_container() -> None:
    with pytest.raises(ValueError, match="model has a key of type tuple; use str, int"):
        BufferSlot().take({"model": {(1, 2): torch.ones(1)}})


def test_unsupported_top_level_object_names_the_state() -> None:
    with pytest.raises(ValueError, match=r"the state is a builtins\.set"):
        BufferSlot().take({1, 2})


# -- rebuild of damaged skeletons ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("skeleton", "message"),
    [
        ({"T": 3}, "skeleton refers to tensor 3, but the file holds 1"),
        ({"T": "0"}, "skeleton refers to tensor '0'"),
        ({"T": -1}, "skeleton refers to tensor -1"),
        ({"F": "1.5"}, "malformed float"),
        ({"X": []}, "unknown skeleton tag 'X'"),
        ({"D": [], "L": []}, "malformed skeleton node"),
        ({"L": [{"T": 9}]}, "skeleton refers to tensor 9"),
    ],
)
def test_rebuild_rejects_a_damaged_skeleton_with_value_error(skeleton, message) -> None:
    with pytest.raises(ValueError, match=message):
        rebuild(skeleton, [torch.zeros(1)])


def test_walk_tensors_yields_every_tensor_in_order_including_duplicates() -> None:
    a, b = torch.zeros(1), torch.ones(1)
    found = list(walk_tensors({"x": [a, (b, {"y": a})], "z": 3}))
    assert len(found) == 3
    assert found[0] is a and found[1] is b and found[2] is a


# -- the CUDA branch, on a CUDA device played by the CPU (tests/test_cuda.py runs it on a real one) ------------


def test_device_copies_record_blocking_events_and_are_waited_on_with_their_own_device_current(monkeypatch) -> None:
    fake = FakeCuda().install(monkeypatch)
    state = {"a": fake.tensor(torch.arange(6.0), 1), "b": fake.tensor(torch.ones(3), 3)}
    snapshot = BufferSlot().take(state)
    assert [e.kwargs for e in fake.events] == [{"blocking": True}] * 2  # the waiting threads sleep, not spin
    assert sorted(e.recorded_on for e in fake.events) == [1, 3]
    snapshot.wait_until_copied()  # as the writer or hand-off thread does, whose current device is 0
    assert sorted(w for e in fake.events for w in e.waited_on) == [("device", 1), ("device", 3)]
    assert torch.equal(snapshot.tensors[0], torch.arange(6.0)) and torch.equal(snapshot.tensors[1], torch.ones(3))
    assert not any(isinstance(t, FakeCudaTensor) for t in snapshot.tensors)


@pytest.mark.parametrize("view", ["conj", "neg"])
def test_a_conjugate_or_negative_view_is_resolved_on_the_side_stream_before_its_copy(monkeypatch, view) -> None:
    fake = FakeCuda().install(monkeypatch)
    values = torch.tensor([1 + 2j, 3 - 4j])
    source = values.conj() if view == "conj" else torch._neg_view(values)
    snapshot = BufferSlot().take({"z": fake.tensor(source, 2)})
    copies = [entry for entry in fake.log if entry[0] == "copy_"]
    assert copies, "the snapshot made no copy"
    # A copy from a source still carrying the bit applies it on the host right away, racing the DMA.
    assert all(bits == [(False, False), (False, False)] for _, _, bits in copies), copies
    assert all(where == ("stream", 2) for _, where, _ in copies)
    snapshot.wait_until_copied()
    assert torch.equal(snapshot.tensors[0], source.resolve_conj().resolve_neg())
