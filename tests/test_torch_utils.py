"""torch tensors and Hugging Face KV caches through V-Frames and V-Streams (CPU only)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import resonant  # noqa: E402
from resonant import DType, MsgType, quant  # noqa: E402
from resonant import torch_utils as tu  # noqa: E402
from resonant.errors import UnsupportedDType  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]
WIRE_DTYPE = {torch.float32: DType.F32, torch.float16: DType.F16, torch.bfloat16: DType.BF16, torch.int8: DType.I8}


def _tensor(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _buffer_range(data: bytes) -> tuple[int, int]:
    a = np.frombuffer(data, np.uint8)
    return _addr(a), _addr(a) + a.size


# ------------------------------------------------------------------ to_numpy / to_slice / to_torch


@pytest.mark.parametrize("dtype", DTYPES)
def test_to_numpy_is_a_view(dtype):
    t = _tensor((3, 5), dtype)
    a = tu.to_numpy(t)
    assert _addr(a) == t.data_ptr()
    assert a.shape == (3, 5)
    want = {torch.float32: np.float32, torch.float16: np.float16, torch.int8: np.int8,
            torch.bfloat16: ml_dtypes.bfloat16}[dtype]
    assert a.dtype == np.dtype(want)
    np.testing.assert_array_equal(a.view(np.uint8), t.view(torch.uint8).numpy())


def test_to_numpy_detaches_and_rejects_other_types():
    t = torch.ones(3, requires_grad=True)
    a = tu.to_numpy(t)
    assert _addr(a) == t.data_ptr()
    with pytest.raises(UnsupportedDType):
        tu.to_numpy(torch.ones(3, dtype=torch.float64))
    with pytest.raises(UnsupportedDType):
        tu.to_numpy(torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError):
        tu.to_numpy(np.ones(3, np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_input_is_copied_correctly(dtype):
    base = _tensor((6, 8), dtype, seed=1)
    t = base[::2, 1::3].t()
    assert not t.is_contiguous()
    a = tu.to_numpy(t)
    assert a.flags.c_contiguous and a.shape == tuple(t.shape)
    assert not (base.data_ptr() <= _addr(a) < base.data_ptr() + base.numel() * base.element_size())
    np.testing.assert_array_equal(a.view(np.uint8), t.contiguous().view(torch.uint8).numpy())
    back = tu.to_torch(resonant.decode(resonant.encode(resonant.Think(tu.to_slice(t)))).hidden)
    assert torch.equal(back, t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_frame_round_trip_is_exact_and_zero_copy(dtype):
    t = _tensor((2, 7, 16), dtype, seed=2)
    s = tu.to_slice(t)
    assert s.dtype == WIRE_DTYPE[dtype]
    assert s.nbytes == t.numel() * t.element_size()  # bf16 stays 2 bytes, never widened
    wire = resonant.encode(resonant.Think(s, stream_id=3))
    msg = resonant.decode(wire)
    assert msg.hidden.dtype == WIRE_DTYPE[dtype]
    back = tu.to_torch(msg.hidden)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))  # bit for bit
    lo, hi = _buffer_range(wire)
    assert lo <= back.data_ptr() and back.data_ptr() + t.numel() * t.element_size() <= hi  # a view of wire
    assert back.data_ptr() == _addr(msg.hidden.numpy())


def test_bfloat16_special_values_round_trip_bit_for_bit():
    bits = torch.tensor([0x0000, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x807F, 0x7F7F, 0x3F80, 0x7FC1],
                        dtype=torch.int32).to(torch.int16)
    t = bits.view(torch.bfloat16)
    back = tu.to_torch(resonant.decode(resonant.encode(resonant.Think(tu.to_slice(t)))).hidden)
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.view(torch.int16), bits)


def test_to_slice_is_a_view_until_encoded():
    t = torch.zeros(4, 8)
    s = tu.to_slice(t)
    t[0, 0] = 5.0  # the slice sees the tensor's memory
    msg = resonant.decode(resonant.encode(resonant.Think(s)))
    assert tu.to_torch(msg.hidden)[0, 0] == 5.0


def test_to_torch_of_arrays_is_a_view():
    for a in (np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(6, dtype=np.float16),
              np.arange(-3, 3, dtype=np.int8), np.linspace(-1, 1, 10).astype(ml_dtypes.bfloat16)):
        t = tu.to_torch(a)
        assert t.data_ptr() == _addr(a)
        np.testing.assert_array_equal(tu.to_numpy(t).view(np.uint8), a.view(np.uint8))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_to_torch_dequantizes_quantized_slices(kind):
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    s = quant.quantize(x, kind)
    msg = resonant.decode(resonant.encode(resonant.Think(s)))
    t = tu.to_torch(msg.hidden)
    assert t.dtype == torch.float32 and tuple(t.shape) == x.shape
    np.testing.assert_array_equal(t.numpy(), quant.dequantize(s))


# ------------------------------------------------------------------ KV caches over V-Streams


def _kv(layers=3, dtype=torch.float16, heads=2, seq=40, dim=16, seed=4):
    return [(_tensor((1, heads, seq, dim), dtype, seed + 2 * i), _tensor((1, heads, seq, dim), dtype, seed + 2 * i + 1))
            for i in range(layers)]


def _dynamic_cache(pairs):
    transformers = pytest.importorskip("transformers")
    cache = transformers.DynamicCache()
    for i, (k, v) in enumerate(pairs):
        cache.update(k, v, i)
    return cache


def _run(sender, codec=None):
    """Feed a sender's frames in order; (events, index of the frame that caused each event)."""
    r = resonant.Reassembler(codec=codec)
    events, at = [], []
    for i, data in enumerate(sender):
        for e in r.receive(data, now=float(i)):
            events.append(e)
            at.append(i)
    return events, at


def _assert_same_cache(a, b):
    la, lb = tu.kv_layers(a), tu.kv_layers(b)
    assert len(la) == len(lb)
    for (ka, va), (kb, vb) in zip(la, lb):
        assert ka.dtype == kb.dtype and va.dtype == vb.dtype
        assert torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dynamic_cache_round_trip(dtype):
    transformers = pytest.importorskip("transformers")
    pairs = _kv(dtype=dtype)
    cache = _dynamic_cache(pairs)
    sender = tu.kv_stream(11, cache)
    names = [o.name for o in sender.layout.objects]
    assert names == ["l0.keys", "l0.values", "l1.keys", "l1.values", "l2.keys", "l2.values"]
    assert [o.layer for o in sender.layout.objects] == [0, 0, 1, 1, 2, 2]
    assert sender.layout.msg_type == MsgType.CACHE
    events, _ = _run(sender)
    started, done = events[0], events[-1]
    assert isinstance(started, resonant.StreamStarted) and isinstance(done, resonant.StreamComplete)
    back = tu.kv_from_stream(done, started.layout)
    assert isinstance(back, transformers.DynamicCache)
    _assert_same_cache(back, cache)
    assert back.get_seq_length() == cache.get_seq_length() == 40


def test_dynamic_cache_from_stream_is_zero_copy():
    """The DynamicCache's layers are tensors over the stream's buffer, as kv_from_arrays promises
    (regression: DynamicLayer.update() made a torch.cat copy), and the cache still grows."""
    pairs = _kv(layers=2)
    events, _ = _run(tu.kv_stream(18, _dynamic_cache(pairs)))
    done = events[-1]
    back = tu.kv_from_stream(done, events[0].layout)
    for (k, v), ak, av in zip(tu.kv_layers(back), done.objects[::2], done.objects[1::2]):
        assert k.data_ptr() == _addr(ak) and v.data_ptr() == _addr(av)
    assert back.get_seq_length() == 40
    k_new, v_new = _tensor((1, 2, 1, 16), torch.float16, 99), _tensor((1, 2, 1, 16), torch.float16, 98)
    k_all, v_all = back.update(k_new, v_new, 0)   # a decoding step: concatenates into new tensors
    assert k_all.shape[-2] == 41 and torch.equal(k_all[..., :40, :], pairs[0][0])
    assert torch.equal(v_all[..., 40:, :], v_new)
    assert back.get_seq_length() == 41
    assert torch.equal(tu.to_torch(done.objects[0]), pairs[0][0])  # the received buffer is untouched


def test_legacy_tuple_round_trip():
    pairs = _kv(layers=2, dtype=torch.float32)
    legacy = tuple(pairs)
    events, _ = _run(tu.kv_stream(12, legacy))
    back = tu.kv_from_stream(events[-1], events[0].layout, legacy=True)
    assert isinstance(back, tuple) and len(back) == 2
    for (k, v), (k2, v2) in zip(pairs, back):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    # legacy tensors are views of the stream's buffer (no copy after reassembly)
    for (k, v), ak, av in zip(back, events[-1].objects[::2], events[-1].objects[1::2]):
        assert k.data_ptr() == _addr(ak) and v.data_ptr() == _addr(av)
    # a legacy tuple in, a DynamicCache out (and the other way round)
    _assert_same_cache(tu.kv_from_stream(events[-1], events[0].layout), legacy)
    events2, _ = _run(tu.kv_stream(13, _dynamic_cache(pairs)))
    _assert_same_cache(tu.kv_from_stream(events2[-1], legacy=True), legacy)


def test_dynamic_cache_through_a_codec():
    pairs = _kv(layers=2, dtype=torch.bfloat16)
    codec = resonant.Codec(zstd_level=1, key=resonant.Key.generate())
    events, _ = _run(tu.kv_stream(14, _dynamic_cache(pairs), codec=codec), codec=codec)
    assert isinstance(events[-1], resonant.StreamComplete)
    _assert_same_cache(tu.kv_from_stream(events[-1], events[0].layout), tuple(pairs))


def test_layer_zero_is_ready_before_the_stream_completes():
    pairs = _kv(layers=3, dtype=torch.float16, seq=64, dim=32)  # 8 KiB per tensor
    sender = tu.kv_stream(15, _dynamic_cache(pairs), max_frame_bytes=2048)
    total_frames = sender.layout.chunks + 2
    assert sender.layout.chunks > 12
    events, at = _run(sender)
    ready = [(e, i) for e, i in zip(events, at) if isinstance(e, resonant.ObjectReady)]
    assert [e.name for e, _ in ready] == ["l0.keys", "l0.values", "l1.keys", "l1.values", "l2.keys", "l2.values"]
    complete_at = at[-1]
    assert isinstance(events[-1], resonant.StreamComplete) and complete_at == total_frames - 1
    l0 = [i for e, i in ready if e.layer == 0]
    assert max(l0) < complete_at - 8          # layer 0 arrives while later layers are still in flight
    first_l1 = min(i for e, i in ready if e.layer == 1)
    assert max(l0) < first_l1
    for e, _ in ready:                         # and each ready object is already final
        k, v = pairs[e.layer]
        want = k if e.name.endswith(".keys") else v
        assert torch.equal(tu.to_torch(e.array), want)


def test_wrong_stream_is_rejected():
    pairs = _kv(layers=1, dtype=torch.float32)
    arrays = [tu.to_numpy(pairs[0][0]), tu.to_numpy(pairs[0][1])]
    think = resonant.StreamSender(16, arrays, msg_type=MsgType.THINK, names=["l0.keys", "l0.values"])
    events, _ = _run(think)
    with pytest.raises(ValueError, match="not Cache"):
        tu.kv_from_stream(events[-1], events[0].layout)
    unnamed = resonant.StreamSender(17, arrays, msg_type=MsgType.CACHE, names=["a", "b"])
    events, _ = _run(unnamed)
    with pytest.raises(ValueError, match="not a KV cache"):
        tu.kv_from_stream(events[-1], events[0].layout)
    with pytest.raises(ValueError):
        tu.kv_from_arrays(arrays[:1])
    with pytest.raises(TypeError):
        tu.kv_layers(object())
    with pytest.raises(TypeError):
        tu.kv_layers([(pairs[0][0],)])


def test_kv_cache_as_cache_messages_layer_by_layer():
    from transformers import DynamicCache

    import resonant
    from resonant import torch_utils as tu

    cache = DynamicCache()
    for i in range(4):
        cache.update(torch.randn(1, 2, 6, 8, dtype=torch.bfloat16), torch.randn(1, 2, 6, 8, dtype=torch.bfloat16), i)
    msgs = tu.kv_messages(cache, stream_id=3)
    assert [m.frame_seq for m in msgs] == [0, 1, 2, 3] and all(isinstance(m, resonant.Cache) for m in msgs)
    received = [resonant.decode(resonant.encode(m)) for m in reversed(msgs)]  # any order
    back = tu.kv_from_messages(received)
    for a, b in zip(cache.layers, back.layers):
        assert b.keys.dtype == torch.bfloat16 and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    legacy = tu.kv_from_messages(received, legacy=True)
    assert len(legacy) == 4 and torch.equal(legacy[2][1], cache.layers[2].values)
    with pytest.raises(ValueError, match="appears twice"):
        tu.kv_from_messages(received + received[:1])
    big = DynamicCache()
    big.update(torch.zeros(1, 8, 512, 64), torch.zeros(1, 8, 512, 64), 0)
    with pytest.raises(resonant.EncodeError, match="max_frame_bytes"):
        tu.kv_messages(big)


def test_kv_from_messages_names_a_cache_that_fits_no_layout():
    """A decoded Cache need not fit its layout (liberal decoding: a reference peer may put two
    layers' K and V in one frame); kv_from_messages says so instead of an AttributeError on None."""
    four = resonant.make_frame(MsgType.CACHE, [resonant.Slice.from_array(np.ones((2, 4), np.float16))] * 4)
    frame = resonant.decode(resonant.encode(four))
    assert frame.keys is None
    with pytest.raises(ValueError, match=r"^layer 0: .*Cache carries 2 slices, got 4"):
        tu.kv_from_messages([frame])
