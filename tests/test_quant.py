"""Q8_0 / Q4_0 (against a direct, independent implementation of ggml's reference formulas),
the fp16 conversion, the adaptive choice, SparseCoo (SPARSE_COO_U32) and the Critique helpers.

The reference below is written from llama.cpp's ggml-quants.c (quantize_row_q8_0_ref,
quantize_row_q4_0_ref, dequantize_row_q8_0, dequantize_row_q4_0) in numpy float32 scalar
arithmetic, so it shares nothing with resonant's C kernels (_quant.pxi) but the formulas.
"""

from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import resonant
from resonant import DType, Slice, _codec, quant, refcodec
from resonant import critique as crit
from resonant.errors import EncodeError, ResonantError, SizeMismatch, UnsupportedDType

F32 = np.float32
FLT_MAX = float(np.finfo(np.float32).max)


# ====================================================================== the direct reference


def f16_bits(v) -> int:
    """IEEE binary16 bits of a float32, round to nearest even (numpy's conversion)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return int(np.array(v, np.float32).astype(np.float16).view(np.uint16))


def f16_to_f32(bits: int) -> np.float32:
    return np.array(bits, np.uint16).view(np.float16).astype(np.float32)[()]


def _blocks(x) -> tuple[np.ndarray, int]:
    """x's values (C order) as float32, padded with zeros to whole blocks of 32."""
    v = np.asarray(x, np.float32).ravel()
    nb = -(-v.size // 32)
    out = np.zeros(nb * 32, np.float32)
    out[:v.size] = v
    return out.reshape(nb, 32), v.size


def _c_trunc_int(v: np.float32) -> int:
    """C's float -> integer conversion (truncation toward zero) of a finite float."""
    return int(math.trunc(float(v)))


def _roundf(v: np.float32) -> int:
    """C roundf (half away from zero) of a finite float32, as an integer: exact in float64,
    because |v| + 0.5 is exact in float64 for any float32 |v| < 2**52."""
    r = float(v)
    return int(math.copysign(math.floor(abs(r) + 0.5), r))


def ref_quantize_q8_0(x) -> tuple[bytes, set[int]]:
    """ggml quantize_row_q8_0_ref, block by block, plus the set of blocks where 1/d overflows to inf
    (max|x| below ~3.7e-37): x*id is then inf or NaN and roundf(inf) -> int8_t is undefined
    behaviour in C. ggml's x86 build writes 0 there (cvttss2si gives 0x80000000, low byte 0), and
    so does resonant (it checks 1/d); so does this reference. fp16(d) is 0 there anyway."""
    blocks, _ = _blocks(x)
    out = bytearray()
    undefined = set()
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for b, blk in enumerate(blocks):
            amax = F32(0.0)
            for v in blk:                       # amax = MAX(amax, fabsf(v))
                a = np.abs(v)
                amax = a if a > amax else amax
            d = F32(amax / F32(127))            # float32 division
            idd = F32(F32(1.0) / d) if d != 0 else F32(0.0)
            out += struct.pack("<H", f16_bits(d))
            if not np.isfinite(idd):
                undefined.add(b)
                out += bytes(32)
                continue
            for v in blk:
                q = _roundf(F32(v * idd))        # x0 = x*id in float32, then roundf
                assert -128 <= q <= 127, (v, idd, q)
                out.append(q & 0xFF)
    return bytes(out), undefined


def ref_quantize_q4_0(x) -> tuple[bytes, set[int]]:
    """ggml quantize_row_q4_0_ref, block by block (blocks where 1/d is inf as for Q8_0: codes 0,
    what (int8_t)(inf or NaN) gives on x86)."""
    blocks, _ = _blocks(x)
    out = bytearray()
    undefined = set()
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for b, blk in enumerate(blocks):
            amax = F32(0.0)
            mx = F32(0.0)
            for v in blk:                       # if (amax < fabsf(v)) { amax = fabsf(v); max = v; }
                if amax < np.abs(v):
                    amax = np.abs(v)
                    mx = v
            d = F32(mx / F32(-8))
            idd = F32(F32(1.0) / d) if d != 0 else F32(0.0)
            out += struct.pack("<H", f16_bits(d))
            if not np.isfinite(idd):
                undefined.add(b)
                out += bytes(16)
                continue
            for j in range(16):
                x0 = F32(blk[j] * idd)
                x1 = F32(blk[16 + j] * idd)
                i0 = _c_trunc_int(F32(x0 + F32(8.5)))   # (int8_t)(x0 + 8.5f)
                i1 = _c_trunc_int(F32(x1 + F32(8.5)))
                assert -128 <= i0 <= 127 and -128 <= i1 <= 127
                xi0 = min(15, i0) & 0xFF                # const uint8_t xi0 = MIN(15, ...)
                xi1 = min(15, i1) & 0xFF
                out.append((xi0 | (xi1 << 4)) & 0xFF)   # qs[j] = xi0; qs[j] |= xi1 << 4
    return bytes(out), undefined


def ref_dequantize_q8_0(payload: bytes, n: int) -> np.ndarray:
    """ggml dequantize_row_q8_0: y = qs[j] * d, d = fp16 -> fp32."""
    payload = bytes(payload)
    nb = -(-n // 32)
    assert len(payload) == nb * 34
    y = np.empty(nb * 32, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for b in range(nb):
            blk = payload[b * 34:(b + 1) * 34]
            d = f16_to_f32(blk[0] | (blk[1] << 8))
            for j in range(32):
                q = blk[2 + j] - 256 if blk[2 + j] >= 128 else blk[2 + j]
                y[b * 32 + j] = F32(F32(q) * d)
    return y[:n]


def ref_dequantize_q4_0(payload: bytes, n: int) -> np.ndarray:
    """ggml dequantize_row_q4_0: x0 = (qs[j] & 0xF) - 8, x1 = (qs[j] >> 4) - 8; y = x*d."""
    payload = bytes(payload)
    nb = -(-n // 32)
    assert len(payload) == nb * 18
    y = np.empty(nb * 32, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for b in range(nb):
            blk = payload[b * 18:(b + 1) * 18]
            d = f16_to_f32(blk[0] | (blk[1] << 8))
            for j in range(16):
                y[b * 32 + j] = F32(F32((blk[2 + j] & 0x0F) - 8) * d)
                y[b * 32 + 16 + j] = F32(F32((blk[2 + j] >> 4) - 8) * d)
    return y[:n]


REF = {
    "q8_0": (ref_quantize_q8_0, ref_dequantize_q8_0, 34),
    "q4_0": (ref_quantize_q4_0, ref_dequantize_q4_0, 18),
}


def assert_same_f32(a: np.ndarray, b: np.ndarray) -> None:
    """Bit for bit, except that any NaN equals any NaN (NaN payloads and signs are the CPU's)."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    assert a.shape == b.shape
    na, nb = np.isnan(a), np.isnan(b)
    np.testing.assert_array_equal(na, nb)
    np.testing.assert_array_equal(a[~na].view(np.uint32), b[~nb].view(np.uint32))


def check_against_reference(x, kind: str) -> set[int]:
    """Our payload equals the reference's bytes, and our dequantization equals the reference's,
    bit for bit. Returns the blocks whose 1/d overflowed (codes 0 by convention, d = fp16 0)."""
    qref, dqref, bsize = REF[kind]
    arr = np.asarray(x)
    s = quant.quantize(arr, kind)
    assert s.dtype == (DType.Q8_0 if kind == "q8_0" else DType.Q4_0)
    assert s.shape == arr.shape
    ours = s.tobytes()
    want, overflowed = qref(arr)
    assert len(ours) == len(want)
    for b in range(len(want) // bsize):
        lo = b * bsize
        assert ours[lo:lo + bsize] == want[lo:lo + bsize], (
            f"block {b}: ours {ours[lo:lo + bsize].hex()} reference {want[lo:lo + bsize].hex()}")
    n = arr.size
    got = quant.dequantize(s)
    assert got.dtype == np.float32 and got.shape == arr.shape
    assert_same_f32(got.ravel(), dqref(want, n))
    for b in overflowed:
        assert not np.any(got.ravel()[b * 32:(b + 1) * 32])
    return overflowed


# ---------------------------------------------------------------- the reference itself


def test_reference_q8_0_by_hand():
    # amax 127 -> d = 1 exactly (fp16 0x3c00), q = x, ties round away from zero
    x = np.zeros(32, np.float32)
    x[:6] = [127, -127, 2.5, -2.5, 0.5, -0.4]
    payload, undefined = ref_quantize_q8_0(x)
    assert not undefined
    assert payload[:2] == b"\x00\x3c"
    assert list(np.frombuffer(payload, np.int8, 6, 2)) == [127, -127, 3, -3, 1, 0]
    np.testing.assert_array_equal(ref_dequantize_q8_0(payload, 6), [127, -127, 3, -3, 1, 0])


def test_reference_q4_0_by_hand():
    # max = -8 -> d = 1 (fp16 0x3c00); q = min(15, trunc(x + 8.5)); element j low, j + 16 high
    x = np.zeros(32, np.float32)
    x[0], x[1], x[2], x[3], x[16], x[17], x[18] = -8, 7, 8, -0.5, 0.5, 6.5, 7.6
    payload, undefined = ref_quantize_q4_0(x)
    assert not undefined
    assert payload[:2] == b"\x00\x3c"
    qs = payload[2:]
    lo = [b & 15 for b in qs]
    hi = [b >> 4 for b in qs]
    assert lo[:4] == [0, 15, 15, 8]        # -8 -> 0; 7 -> 15; 8 clips to 15; -0.5 -> trunc(8.0) = 8
    assert hi[:3] == [9, 15, 15]           # 0.5 -> 9; 6.5 -> 15; 7.6 -> trunc(16.1) = 16 -> 15
    assert lo[4] == 8 and hi[4] == 8       # zeros -> 8
    y = ref_dequantize_q4_0(payload, 32)
    assert list(y[[0, 1, 2, 3, 16, 17, 18]]) == [-8, 7, 7, 0, 1, 7, 7]


def test_reference_fp16_is_round_to_nearest_even():
    assert f16_bits(F32(1 + 2 ** -11)) == 0x3C00          # tie -> even (1.0)
    assert f16_bits(F32(1 + 3 * 2 ** -11)) == 0x3C02      # tie -> even (1 + 2^-9)
    assert f16_bits(F32(65520.0)) == 0x7C00               # rounds past the largest half: inf
    assert f16_bits(F32(2 ** -25)) == 0x0000              # half of the smallest subnormal -> 0 (even)


# ====================================================================== byte-exact, fixed inputs


def _fixed_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20241103)
    out: dict[str, np.ndarray] = {
        "normal_1000": rng.standard_normal(1000).astype(np.float32),
        "normal_2d": rng.standard_normal((7, 96)).astype(np.float32),
        "uniform": rng.uniform(-3, 3, 320).astype(np.float32),
        "uniform_positive": rng.uniform(0, 1, 96).astype(np.float32),
        "len1": np.array([0.3], np.float32),
        "len1_negative": np.array([-1e-3], np.float32),
        "len31": rng.standard_normal(31).astype(np.float32),
        "len32": rng.standard_normal(32).astype(np.float32),
        "len33": rng.standard_normal(33).astype(np.float32),
        "zeros_64": np.zeros(64, np.float32),
        "neg_zeros": np.full(32, -0.0, np.float32),
        "small_1e-6": (rng.standard_normal(96) * 1e-6).astype(np.float32),
        "large_6e4": (rng.standard_normal(96) * 6e4).astype(np.float32),
        "huge_fp16_scale_overflow": (rng.standard_normal(64) * 1e7).astype(np.float32),
        "fp16_subnormal_scale": (rng.standard_normal(96) * 3e-4).astype(np.float32),
        "fp16_subnormal_scale_small": (rng.standard_normal(96) * 2e-6).astype(np.float32),
        "float32_subnormal_d": (rng.standard_normal(64) * 1e-36).astype(np.float32),
        "mixed_magnitudes": np.concatenate([rng.standard_normal(32) * s for s in (1e-30, 1e-5, 1, 1e4, 1e30)])
        .astype(np.float32),
        "float64_input": rng.standard_normal(100),
        "float16_input": rng.standard_normal(70).astype(np.float16),
        "int_input": np.arange(-40, 40, dtype=np.int32),
    }
    # a block with a single nonzero (positive and negative), at several positions
    for pos in (0, 17, 31):
        for sgn in (1, -1):
            x = np.zeros(64, np.float32)
            x[32 + pos] = sgn * 0.75
            out[f"single_nonzero_{pos}_{'+' if sgn > 0 else '-'}"] = x
    # negative max (Q4_0 d > 0), positive max (d < 0), and ties of |max| between signs
    neg = rng.uniform(-1, 1, 32).astype(np.float32)
    neg[5] = -2.0
    out["negative_max"] = neg
    out["positive_max"] = -neg
    tie = np.zeros(32, np.float32)
    tie[3], tie[9] = 1.5, -1.5        # first one wins: max = +1.5
    out["abs_tie_pos_first"] = tie
    out["abs_tie_neg_first"] = -tie   # max = -1.5
    # exact .5 ties after scaling: amax 127 -> d = 1, id = 1 (Q8_0); amax 63.5 -> id = 2
    t8 = np.array([127, -127] + [k + 0.5 for k in range(-15, 15)], np.float32)
    out["q8_ties_d1"] = t8
    out["q8_ties_d_half"] = np.array([63.5] + [k * 0.5 + 0.25 for k in range(-15, 16)], np.float32)
    # Q4_0: max -8 -> d = 1, id = 1; x + 8.5 integral -> trunc sits exactly on the integer
    out["q4_ties_d1"] = np.array([-8] + [k + 0.5 for k in range(-8, 8)] + list(range(-7, 8)), np.float32)
    out["q4_clip"] = np.array([-8, 8, 7.5, 7.49, 7.51, 8] + [0] * 26, np.float32)
    # fp16 rounding ties of d itself: d = 1 + 2^-11 (-> 1.0) and 1 + 3*2^-11 (-> 1 + 2^-9)
    for name, dval in (("d_tie_even_down", 1 + 2 ** -11), ("d_tie_even_up", 1 + 3 * 2 ** -11)):
        x = np.linspace(-1, 1, 32).astype(np.float32) * F32(127 * dval)
        out[f"q8_{name}"] = x
        y = np.linspace(-1, 1, 32).astype(np.float32) * F32(8 * dval)
        out[f"q4_{name}"] = y
    # blocks near the largest finite float32
    out["near_flt_max"] = np.array([FLT_MAX, -FLT_MAX / 3, 1.0] + [0.0] * 29, np.float32)
    return out


FIXED = _fixed_inputs()


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("name", sorted(FIXED))
def test_bytes_match_reference_fixed(name, kind):
    check_against_reference(FIXED[name], kind)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_all_zero_block_scale_and_codes(kind):
    s = quant.quantize(np.zeros(32, np.float32), kind)
    p = s.tobytes()
    if kind == "q8_0":
        assert p == bytes(34)                      # d = +0, q = 0
    else:
        assert p[:2] == b"\x00\x80"                # max stays +0.0, d = 0 / -8 = -0.0
        assert p[2:] == b"\x88" * 16               # id = 0 -> trunc(8.5) = 8 in both nibbles
    assert not quant.dequantize(s).any()


def test_q8_0_single_value_is_exact_at_127():
    x = np.zeros(40, np.float32)
    x[33] = -3.0
    s = quant.quantize(x, "q8_0")
    p = s.tobytes()
    assert p[34 + 2 + 1] == (-127) & 0xFF
    assert quant.dequantize(s)[33] == F32(-127) * f16_to_f32(f16_bits(F32(3.0) / F32(127)))


def test_partial_block_padding_does_not_change_scale():
    # padding zeros do not enter max|x|: 33 values = one full block plus a one-value block
    x = np.full(33, 0.5, np.float32)
    x[32] = -5.0
    for kind in ("q8_0", "q4_0"):
        p = quant.quantize(x, kind).tobytes()
        size = 34 if kind == "q8_0" else 18
        assert len(p) == 2 * size
        d = f16_to_f32(p[size] | (p[size + 1] << 8))
        assert d == f16_to_f32(f16_bits(F32(5.0) / F32(127) if kind == "q8_0" else F32(-5.0) / F32(-8)))


def test_lengths_and_payload_sizes():
    for n in (0, 1, 31, 32, 33, 63, 64, 65, 1000):
        x = np.linspace(-1, 1, n).astype(np.float32)
        assert quant.quantize(x, "q8_0").nbytes == -(-n // 32) * 34
        assert quant.quantize(x, "q4_0").nbytes == -(-n // 32) * 18
        assert quant.dequantize(quant.quantize(x, "q8_0")).shape == (n,)


def test_zero_d_array_and_non_contiguous_input():
    s = quant.quantize(np.float32(2.5), "q8_0")
    assert s.shape == () and quant.dequantize(s).shape == ()
    base = np.random.default_rng(3).standard_normal((64, 10)).astype(np.float32)
    view = base[::2, 1::3]
    for kind in ("q8_0", "q4_0"):
        assert quant.quantize(view, kind).tobytes() == quant.quantize(np.ascontiguousarray(view), kind).tobytes()
        check_against_reference(view, kind)
    big_endian = base.astype(">f4")
    assert quant.quantize(big_endian, "q8_0").tobytes() == quant.quantize(base, "q8_0").tobytes()


def test_bfloat16_input_is_widened_exactly():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(4).standard_normal(100).astype(ml_dtypes.bfloat16)
    for kind in ("q8_0", "q4_0"):
        assert quant.quantize(x, kind).tobytes() == quant.quantize(x.astype(np.float32), kind).tobytes()


# ====================================================================== byte-exact, Hypothesis

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
f32_arrays = hnp.arrays(np.float32, st.integers(1, 130), elements=finite_f32)


@st.composite
def scaled_blocks(draw):
    """Blocks with a common scale and small-integer multiples of it: many exact rounding ties
    and values at the clipping edge."""
    scale = draw(st.floats(min_value=float(F32(1e-30)), max_value=float(F32(1e30)), width=32))
    ks = draw(st.lists(st.integers(-254, 254), min_size=1, max_size=96))
    return (np.array(ks, np.float32) * F32(0.5) * F32(scale)).astype(np.float32)


@given(x=f32_arrays)
@example(x=np.array([FLT_MAX, -FLT_MAX], np.float32))
@example(x=np.array([1e-38, -1e-40, 1.4e-45], np.float32))
@example(x=np.array([2.5, -127.0], np.float32))
def test_q8_0_bytes_match_reference_hypothesis(x):
    check_against_reference(x, "q8_0")


@given(x=f32_arrays)
@example(x=np.array([FLT_MAX, -FLT_MAX], np.float32))
@example(x=np.array([1e-38, -1e-40, 1.4e-45], np.float32))
@example(x=np.array([-8.0, 7.5, 8.0], np.float32))
def test_q4_0_bytes_match_reference_hypothesis(x):
    check_against_reference(x, "q4_0")


@given(x=scaled_blocks(), kind=st.sampled_from(["q8_0", "q4_0"]))
def test_bytes_match_reference_on_ties_hypothesis(x, kind):
    check_against_reference(x, kind)


@given(data=st.data(), kind=st.sampled_from(["q8_0", "q4_0"]))
def test_dequantize_any_payload_matches_reference(data, kind):
    """Any payload bytes at all (every fp16 d, inf and NaN included) dequantize like ggml."""
    _, dqref, bsize = REF[kind]
    n = data.draw(st.integers(0, 100))
    payload = data.draw(st.binary(min_size=-(-n // 32) * bsize, max_size=-(-n // 32) * bsize))
    with np.errstate(invalid="ignore", over="ignore"):
        got = _codec.dequantize_blocks(payload, n, 8 if kind == "q8_0" else 4)
    assert_same_f32(got, dqref(payload, n))


# ====================================================================== fp16 conversion


def _f16_np(v: np.float32) -> int:
    return f16_bits(v)


F16_CASES = [0.0, -0.0, 1.0, -1.0, 65504.0, -65504.0, 65519.996, 65520.0, 65536.0, 1e10, -1e10, FLT_MAX,
             2 ** -14, 2 ** -14 * (1 - 2 ** -11), 2 ** -24, 2 ** -25, 2 ** -25 * (1 + 2 ** -20), 2 ** -26,
             3 * 2 ** -25, 5 * 2 ** -25, 1.4e-45, 1e-40, 6.1e-5, 5.96e-8, 1 + 2 ** -11, 1 + 3 * 2 ** -11,
             1 + 2 ** -11 + 2 ** -23, 2048 + 1, 2048 + 3, 0.1, 1 / 3, float("inf"), float("-inf")]


@pytest.mark.parametrize("v", F16_CASES)
def test_f32_to_f16_bits_cases(v):
    f = F32(v)
    assert _codec._f32_to_f16_bits(float(f)) == _f16_np(f)


@given(bits=st.integers(0, 2 ** 32 - 1))
@example(bits=0x7F800001)  # signalling NaN
@example(bits=0xFFC00000)  # negative quiet NaN
@example(bits=0x477FF000)  # 65520: the first value that rounds to inf
@example(bits=0x477FEFFF)
@example(bits=0x33000000)  # 2^-25
@example(bits=0x33000001)
@example(bits=0x387FE000)  # just below 2^-14: rounds up into the normal range
def test_f32_to_f16_bits_all_patterns(bits):
    f = np.array(bits, np.uint32).view(np.float32)[()]
    got = _codec._f32_to_f16_bits(float(f))
    if np.isnan(f):
        assert got & 0x7C00 == 0x7C00 and got & 0x03FF, f"{bits:#010x} -> {got:#06x} is not a NaN half"
        assert got & 0x8000 == (bits >> 16) & 0x8000  # the sign is kept
    else:
        assert got == _f16_np(f), f"{bits:#010x}: {got:#06x} != {_f16_np(f):#06x}"


def test_f32_to_f16_bits_every_half_round_trips():
    halves = np.arange(0x10000, dtype=np.uint32).astype(np.uint16)
    as_f32 = halves.view(np.float16).astype(np.float32)
    for h, f in zip(halves.tolist(), as_f32.tolist()):
        got = _codec._f32_to_f16_bits(f)
        if math.isnan(f):
            assert got & 0x7C00 == 0x7C00 and got & 0x3FF
        else:
            assert got == h


def test_f32_to_f16_bits_every_midpoint():
    """Every midpoint between adjacent finite halves (positive), and one float32 ulp either side."""
    h = np.arange(0, 0x7BFF, dtype=np.uint16)
    lo = h.view(np.float16).astype(np.float64)
    hi = (h + 1).astype(np.uint16).view(np.float16).astype(np.float64)
    mid = ((lo + hi) / 2).astype(np.float32)  # exact: midpoints of halves fit in float32
    for m in (mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf))):
        want = m.astype(np.float16).view(np.uint16)
        got = np.array([_codec._f32_to_f16_bits(v) for v in m.tolist()], np.uint16)
        np.testing.assert_array_equal(got, want)


# ====================================================================== round trip, error bounds


def _block_scales(x: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(d as float32 before fp16, d as stored) per element's block."""
    blocks, n = _blocks(x)
    d32 = np.empty(len(blocks), np.float32)
    for b, blk in enumerate(blocks):
        if kind == "q8_0":
            d32[b] = F32(np.abs(blk).max() / F32(127))
        else:
            i = int(np.argmax(np.abs(blk)))
            d32[b] = F32((blk[i] if blk[i] != 0 else F32(0)) / F32(-8))
    dh = d32.astype(np.float16).astype(np.float32)
    return np.repeat(d32, 32)[:n], np.repeat(dh, 32)[:n]


bounded_f32 = st.floats(min_value=-1e5, max_value=1e5, width=32, allow_subnormal=True)
bounded_arrays = hnp.arrays(np.float32, st.integers(1, 200), elements=bounded_f32)


@given(x=bounded_arrays)
@example(x=np.array([127 * (1 + 2 ** -11) * 0.5] * 3 + [127 * (1 + 2 ** -11)], np.float32))
def test_q8_0_round_trip_error_bound(x):
    """Q8_0: q = roundf(x * (1/d)), so |x/d - q| <= 1/2 (+ a few float32 ulps of the product and of
    1/d: |x*id| <= 127.00002 and id = fl(1/d), < 1e-5 in all). But the stored scale is dh = fp16(d),
    not d, and dequantization computes q*dh: |x - q*dh| <= |x - q*d| + |q|*|d - dh| <= d/2 + 127*|d - dh|.
    The naive "d/2 of the stored scale" bound does NOT hold: fp16 keeps 11 bits, so |d - dh| can be
    2^-12 * d and 127 of those add up to ~0.03*d (see the test below). Add one float32 rounding of q*dh."""
    s = quant.quantize(x, "q8_0")
    y = quant.dequantize(s)
    d32, dh = _block_scales(x, "q8_0")
    xd = x.astype(np.float64)
    bound = (d32.astype(np.float64) * (0.5 + 1e-5) + 127 * np.abs(d32.astype(np.float64) - dh)
             + np.abs(y.astype(np.float64)) * 2 ** -24 + 2.0 ** -140)  # + float32-subnormal d (see Q4_0)
    err = np.abs(xd - y.astype(np.float64))
    assert (err <= bound).all(), (x[err > bound], y[err > bound], bound[err > bound])


def test_q8_0_half_step_bound_of_the_stored_scale_does_not_hold():
    """Why the bound above has the 127*|d - dh| term: an example beyond dh/2."""
    d = F32(1.0 + 2 ** -11 - 2 ** -22)   # just below the fp16 tie: stored as 1.0
    x = np.array([127 * d, 126 * d], np.float32)
    y = quant.dequantize(quant.quantize(x, "q8_0"))
    dh = f16_to_f32(f16_bits(d))
    assert dh == 1.0
    assert abs(float(x[0]) - float(y[0])) > dh / 2 * 0.12  # 127*(d - dh) = 0.062 (> 0 at all: not exact)
    assert abs(float(x[0]) - float(y[0])) <= float(d) / 2 + 127 * abs(float(d) - float(dh)) + 1e-6


@given(x=bounded_arrays)
def test_q4_0_round_trip_error_bound(x):
    """Q4_0: d = max/-8 where max is the value of largest magnitude, so t = x/d lies in [-8, 8]; the
    max itself has t = -8 and every value of the same sign as max has t in [-8, 0]; values of the
    opposite sign reach t = +8. q = min(15, trunc(t + 8.5)) and t + 8.5 >= 0.5 > 0, so trunc is
    floor and q - 8 = floor(t + 0.5) = round-half-up(t): |t - (q - 8)| <= 1/2 for t < 7.5. For
    t >= 7.5 (opposite sign to max, |x| >= 15/16 * max|x|) the code 16 is clipped to 15, q - 8 = 7,
    and the error is t - 7, up to one whole step d (at x = -max). So per element
    |x - (q-8)*d| <= max(1/2, t - 7) * |d| (+ float32 rounding of x*id + 8.5: a few ulps of 8.5).
    Dequantization uses dh = fp16(d): add |q - 8| * |d - dh| <= 8 * |d - dh| and one rounding of the
    product. The max element maps to q = 0 exactly: it comes back as -8 * dh."""
    s = quant.quantize(x, "q4_0")
    y = quant.dequantize(s).astype(np.float64)
    d32, dh = _block_scales(x, "q4_0")
    d64 = d32.astype(np.float64)
    xd = x.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d64 != 0, xd / d64, 0.0)
    step = np.maximum(0.5, t - 7) + 4e-6
    # + 2^-140: d itself may be a float32 subnormal, or underflow to 0 (|max| < 2^-147), where its
    # rounding (2^-150 absolute) is not relative any more
    bound = step * np.abs(d64) + 8 * np.abs(d64 - dh) + np.abs(y) * 2 ** -24 + 2.0 ** -140
    err = np.abs(xd - y)
    assert (err <= bound).all(), (x[err > bound], y[err > bound], bound[err > bound])
    # the element of largest magnitude (first on ties) of each block comes back as -8 * dh
    blocks, n = _blocks(x)
    yb = np.zeros(len(blocks) * 32)
    yb[:n] = y
    for b, blk in enumerate(blocks):
        i = int(np.argmax(np.abs(blk)))
        if blk[i] != 0 and b * 32 + i < n:
            assert yb[b * 32 + i] == -8 * float(dh[b * 32])


def test_q4_0_clipping_costs_a_whole_step():
    x = np.zeros(32, np.float32)
    x[0], x[1] = -8.0, 8.0   # d = 1; +8 would need q = 16
    y = quant.dequantize(quant.quantize(x, "q4_0"))
    assert y[0] == -8.0 and y[1] == 7.0


@pytest.mark.parametrize("kind,rel", [("q8_0", 0.01), ("q4_0", 0.15)])
def test_round_trip_relative_error_on_gaussian(kind, rel):
    x = np.random.default_rng(5).standard_normal((64, 384)).astype(np.float32)
    y = quant.dequantize(quant.quantize(x, kind))
    r, _, cos = quant.error_of(x, y)
    assert r < rel and cos > 1 - rel


# ====================================================================== frames, sizes, errors


def _gaussian(shape=(4, 256), seed=6):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_think_frame_round_trip(kind):
    x = _gaussian()
    s = quant.quantize(x, kind)
    frame = resonant.Think(s, stream_id=9, frame_seq=3)
    wire = resonant.encode(frame)
    assert len(wire) == 33 + 2 + 4 * 2 + s.nbytes + 4
    msg = resonant.decode(wire)
    assert msg == frame
    assert msg.hidden.dtype == s.dtype and msg.hidden.shape == x.shape
    assert msg.hidden.tobytes() == s.tobytes()
    assert_same_f32(quant.dequantize(msg.hidden), quant.dequantize(s))
    assert_same_f32(quant.to_float(msg.hidden), quant.dequantize(s))
    with pytest.raises(UnsupportedDType):
        msg.hidden.numpy()


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("compressible", [False, True])
def test_codec_zstd_round_trip(kind, compressible):
    x = _gaussian((8, 512))
    if compressible:
        x[:, 64:] = 0  # mostly empty blocks: zstd pays off
    s = quant.quantize(x, kind)
    codec = resonant.Codec(zstd_level=3)
    wire = codec.encode(resonant.Think(s, stream_id=2))
    msg = codec.decode(wire)
    if compressible:
        assert len(wire) < s.nbytes and msg.transforms
    assert msg.hidden.tobytes() == s.tobytes()
    assert_same_f32(quant.dequantize(msg.hidden), quant.dequantize(s))
    assert resonant.decode(wire).hidden.tobytes() == s.tobytes()  # decode() decompresses too


def _frame_with_short_payload(s: Slice) -> bytes:
    """A Think frame with s's payload one byte short and slice_len saying so (CRC recomputed)."""
    wire = bytearray(resonant.encode(resonant.Think(s)))
    (slice_len,) = struct.unpack_from("<I", wire, 24)
    assert slice_len == s.nbytes
    struct.pack_into("<I", wire, 24, slice_len - 1)
    body = wire[:-5]  # drop the CRC and the payload's last byte
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_payload_size_rule(kind, delta):
    x = _gaussian((3, 40))
    s = quant.quantize(x, kind)
    if delta < 0:
        with pytest.raises(SizeMismatch):
            resonant.decode(_frame_with_short_payload(s))
    with pytest.raises((EncodeError, SizeMismatch)):
        Slice(s.dtype, s.shape, s.tobytes()[:-1] if delta < 0 else s.tobytes() + b"\0")
    bad = s.tobytes()[:-1] if delta < 0 else s.tobytes() + b"\0"
    with pytest.raises(SizeMismatch):
        _codec.dequantize_blocks(bad, x.size, 8 if kind == "q8_0" else 4)
    with pytest.raises(SizeMismatch):
        _codec.dequantize_blocks(s.tobytes(), -1, 8 if kind == "q8_0" else 4)


def test_short_payload_frame_is_a_decode_error_not_a_crash():
    s = quant.quantize(_gaussian((1, 32)), "q8_0")
    with pytest.raises(SizeMismatch) as info:
        resonant.decode(_frame_with_short_payload(s))
    assert isinstance(info.value, resonant.DecodeError)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_rejected(kind, bad):
    x = _gaussian((2, 50)).ravel()
    x[77] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        quant.quantize(x, kind)
    with pytest.raises(ValueError), np.errstate(over="ignore"):
        quant.quantize(np.array([1e39, 0.0]), kind)  # float64 beyond float32: inf after the cast


@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32", DType.F16, "Q9", 0x10])
def test_quantize_rejects_other_dtypes(dtype):
    with pytest.raises((UnsupportedDType, ValueError)):
        quant.quantize(np.ones(4, np.float32), dtype)


def test_quantize_rejects_non_numeric_input_and_dequantize_non_quantized():
    with pytest.raises(UnsupportedDType):
        quant.quantize(np.array([True, False]), "q8_0")
    with pytest.raises(UnsupportedDType):
        quant.quantize(np.array([1 + 2j]), "q4_0")
    with pytest.raises(UnsupportedDType):
        quant.dequantize(Slice.from_array(np.ones(4, np.float16)))


def test_to_float_of_dense_slices_is_a_view():
    a = np.arange(6, dtype=np.float16).reshape(2, 3)
    s = Slice.from_array(a)
    np.testing.assert_array_equal(quant.to_float(s), a)


# ====================================================================== choose()


def test_choose_loose_budget_picks_q4_0():
    x = _gaussian((16, 384))
    c = quant.choose(x, min_cosine=0.99)
    assert c.dtype == DType.Q4_0
    assert c.nbytes == c.slice.nbytes == -(-x.size // 32) * 18
    assert c.cosine >= 0.99
    assert len(c.tried) == 1


def test_choose_q8_0_for_four_nines():
    x = _gaussian((16, 384))
    c = quant.choose(x, min_cosine=0.9999)
    assert c.dtype == DType.Q8_0
    assert [t[0] for t in c.tried] == ["Q4_0", "Q8_0"]
    assert c.tried[0][4] < 0.9999 <= c.cosine
    rel, mrel, cos = quant.error_of(x, quant.dequantize(c.slice))
    assert (rel, mrel, cos) == (c.array_rel_error, c.array_max_rel_error, c.array_cosine)
    old = quant.choose(x, min_cosine=0.9999, per_row=False)  # the whole-array measure, as before
    assert (old.dtype, old.rel_error, old.max_rel_error, old.cosine) == (DType.Q8_0, rel, mrel, cos)
    assert old.cosine_row is None and old.worst_row is None


@pytest.mark.parametrize("budget", [dict(min_cosine=0.9999999), dict(max_rel_error=1e-3),
                                    dict(max_abs_rel_error=2e-3)])
def test_choose_tight_budget_picks_f16(budget):
    x = _gaussian((16, 384))
    c = quant.choose(x, **budget)
    assert c.dtype == DType.F16
    np.testing.assert_array_equal(c.slice.numpy(), x.astype(np.float16))


def test_choose_impossible_budget_takes_the_last_candidate():
    x = _gaussian((4, 64))
    c = quant.choose(x, max_rel_error=0.0)
    assert c.dtype == DType.F32 and c.rel_error == 0.0
    c = quant.choose(x, max_rel_error=0.0, candidates=("q8_0", "q4_0"))
    assert c.dtype == DType.Q8_0 and c.rel_error > 0  # the largest candidate tried, errors reported


def test_choose_tried_is_ordered_by_size():
    x = _gaussian((8, 100))
    c = quant.choose(x, max_rel_error=0.0, candidates=("f32", "f16", "q8_0", "bf16", "q4_0"))
    sizes = [t[1] for t in c.tried]
    assert sizes == sorted(sizes)
    assert [t[0] for t in c.tried][0] == "Q4_0" and c.tried[-1][0] == "F32"
    assert {t[0] for t in c.tried} == {"Q4_0", "Q8_0", "F16", "BF16", "F32"}
    errs = {t[0]: t[2] for t in c.tried}
    assert errs["Q4_0"] > errs["Q8_0"] > errs["BF16"] > errs["F16"] > errs["F32"] == 0


def _bad_row(shape, row) -> np.ndarray:
    """Gaussian rows of 256 values and one row (at index `row` of shape[:-1]) that Q4_0 handles
    badly: one 1.0 and 31 values of ~0.05 per block of 32 (Q4_0's step is 1/8, so the small ones
    round to 0 or +-0.125: that row's cosine is ~0.96), small enough for the whole array's
    cosine to stay above 0.99."""
    x = _gaussian(shape, seed=21)
    r = np.random.default_rng(3).standard_normal(shape[-1]).astype(np.float32) * 0.05
    r[::32] = 1.0
    x[row] = r
    return x


def _brute_rows(x, y):
    """error_of of every row, by a loop (the check of row_errors' vectorized figures)."""
    rows = np.ndindex(x.shape[:-1])
    return {idx: quant.error_of(x[idx], y[idx]) for idx in rows}


# a row is the last axis: a token's vector of (tokens, dim), of (batch, tokens, dim), and of a KV
# tensor (batch, heads, seq, head_dim) one head's vector of one token
ROW_CASES = [((256,), ()), ((16, 256), (5,)), ((3, 8, 256), (2, 6)), ((2, 3, 8, 256), (1, 2, 7))]


@pytest.mark.parametrize("shape, row", ROW_CASES)
def test_choose_per_row_catches_the_row_the_whole_array_hides(shape, row):
    x = _bad_row(shape, row)
    q4 = quant.dequantize(quant.quantize(x, "q4_0"))
    row_cos = quant.error_of(x[row], q4[row])[2]
    assert row_cos < 0.99
    c = quant.choose(x, min_cosine=0.99)
    if len(shape) == 1:  # a 1-D array is one row: per row and whole array are the same measure
        assert c.dtype == DType.Q8_0 and c.cosine_row == c.worst_row == ()
        assert c.cosine == pytest.approx(c.array_cosine, abs=1e-12)
        return
    assert quant.error_of(x, q4)[2] >= 0.99  # the whole array passes with Q4_0 ...
    old = quant.choose(x, min_cosine=0.99, per_row=False)
    assert old.dtype == DType.Q4_0 and old.cosine == old.array_cosine >= 0.99
    assert c.dtype == DType.Q8_0  # ... per row, the bad row needs Q8_0
    assert [t[0] for t in c.tried] == ["Q4_0", "Q8_0"] and c.tried[0][4] == pytest.approx(row_cos, abs=1e-12)
    y = quant.dequantize(c.slice)
    brute = _brute_rows(x, y)
    assert c.cosine == pytest.approx(min(e[2] for e in brute.values()), abs=1e-12)
    assert c.rel_error == pytest.approx(max(e[0] for e in brute.values()), abs=1e-12)
    assert c.max_rel_error == pytest.approx(max(e[1] for e in brute.values()), abs=1e-12)
    assert brute[c.cosine_row][2] == pytest.approx(c.cosine, abs=1e-12)
    assert (c.array_rel_error, c.array_max_rel_error, c.array_cosine) == quant.error_of(x, y)


@pytest.mark.parametrize("shape, row", ROW_CASES)
@pytest.mark.parametrize("budget", [dict(min_cosine=0.99), dict(max_rel_error=0.05), dict(max_abs_rel_error=0.02)])
def test_choose_reports_the_worst_row(shape, row, budget):
    """Every bound is checked per row; the row reported is the planted one (Q4_0 tried first)."""
    x = _bad_row(shape, row)
    c = quant.choose(x, candidates=("q4_0",), **budget)  # one candidate: its figures reported
    assert c.per_row and c.dtype == DType.Q4_0
    brute = _brute_rows(x, quant.dequantize(c.slice))
    want = {"min_cosine": min(brute, key=lambda k: brute[k][2]),
            "max_rel_error": max(brute, key=lambda k: brute[k][0]),
            "max_abs_rel_error": max(brute, key=lambda k: brute[k][1])}[next(iter(budget))]
    assert c.worst_row == want
    if next(iter(budget)) != "max_abs_rel_error":  # max|x - x'| / max|x| is ~1/16 of every Q4_0 row
        assert want == row
    assert c.cosine_row == min(brute, key=lambda k: brute[k][2]) == row
    assert c.rel_error_row == max(brute, key=lambda k: brute[k][0]) == row
    assert c.max_rel_error_row == max(brute, key=lambda k: brute[k][1])


@pytest.mark.parametrize("budget", [dict(max_rel_error=0.12), dict(max_abs_rel_error=0.08)])
def test_choose_per_row_every_bound_picks_the_stricter_dtype(budget):
    """The relative-error bounds are per row too: one row ten times larger than the others
    sets the whole array's norm and max, so the other rows' errors hide under the whole-array
    figures (Q4_0: ~0.09 and ~0.06) but not under their own (up to ~0.18 and ~0.11)."""
    x = _bad_row((16, 256), (5,))
    x[11] *= 10
    old = quant.choose(x, per_row=False, **budget)
    assert old.dtype == DType.Q4_0
    c = quant.choose(x, **budget)
    assert c.dtype == DType.Q8_0 and c.tried[0][0] == "Q4_0"
    brute = _brute_rows(x, quant.dequantize(quant.quantize(x, "q4_0")))
    k = 0 if "max_rel_error" in budget else 1
    bad = max(brute, key=lambda r: brute[r][k])
    assert c.tried[0][2 + k] == pytest.approx(brute[bad][k], abs=1e-12)
    assert brute[bad][k] > next(iter(budget.values()))
    if k == 0:
        assert bad == (5,)


def test_row_errors_edge_cases():
    rel, mrel, cos = quant.row_errors(np.zeros((3, 4)), np.zeros((3, 4)))
    assert rel.shape == (3,) and not rel.any() and not mrel.any() and (cos == 1).all()
    x = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    y = np.array([[1.0, 1.0], [6.0, 8.0], [0.0, 1.0]])
    rel, mrel, cos = quant.row_errors(x, y)
    for i in range(3):
        assert (rel[i], mrel[i], cos[i]) == pytest.approx(quant.error_of(x[i], y[i]))
    assert quant.row_errors(np.ones(5), np.ones(5))[2].shape == ()
    assert quant.row_errors(np.float32(2.0), np.float32(2.0))[2] == 1.0
    assert quant.row_errors(np.zeros((2, 0)), np.zeros((2, 0)))[2].tolist() == [1.0, 1.0]


def test_choose_needs_a_budget():
    with pytest.raises(ValueError, match="budget"):
        quant.choose(_gaussian())
    with pytest.raises(UnsupportedDType):
        quant.choose(_gaussian(), min_cosine=0.9, candidates=("q3_k",))


def test_error_of_edge_cases():
    assert quant.error_of(np.zeros(4), np.zeros(4)) == (0.0, 0.0, 1.0)
    rel, mrel, cos = quant.error_of(np.zeros(4), np.ones(4))
    assert rel == 1.0 and mrel == 1.0 and cos == 0.0
    rel, mrel, cos = quant.error_of(np.array([3.0, 4.0]), np.array([3.0, 4.0]) * 2)
    assert rel == pytest.approx(1.0) and mrel == pytest.approx(1.0) and cos == pytest.approx(1.0)


# ====================================================================== SparseCoo


def _thresholded(x, t):
    return np.where(np.abs(x.astype(np.float32)) > t, x, 0).astype(x.dtype)


@pytest.mark.parametrize("shape", [(50,), (7, 9), (3, 4, 5), (2, 1, 3, 1, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8])
def test_sparse_threshold_round_trip_through_frame(shape, dtype):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 40).astype(dtype)
    t = 30
    s = quant.sparse_from_dense(x, threshold=t)
    assert s.dtype == DType.SPARSE_COO_U32 and s.shape == shape
    msg = resonant.decode(resonant.encode(resonant.Think(s, stream_id=1)))
    sp = quant.parse_sparse(msg.hidden)
    want = _thresholded(x, t)
    assert sp.sorted
    assert sp.values.dtype == x.dtype
    assert sp.coords.shape == (np.count_nonzero(want), len(shape))
    np.testing.assert_array_equal(sp.to_dense(), want)
    np.testing.assert_array_equal(quant.sparse_to_dense(msg.hidden), want)
    # sorted: row-major order of the coordinates
    flat = np.ravel_multi_index(tuple(sp.coords.T.astype(np.intp)), shape)
    assert (np.diff(flat) > 0).all()
    assert s.nbytes == 8 + len(sp.values) * (4 * len(shape) + x.itemsize)


@pytest.mark.parametrize("k", [0, 1, 5, 63, 64, 100])
def test_sparse_top_k_round_trip(k):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((8, 8)).astype(np.float32)
    s = quant.sparse_from_dense(x, top_k=k)
    sp = quant.parse_sparse(resonant.decode(resonant.encode(resonant.Think(s))).hidden)
    kk = min(k, x.size)
    assert len(sp.values) == kk
    want = np.zeros_like(x)
    if kk:
        idx = np.argsort(-np.abs(x).ravel(), kind="stable")[:kk]
        want.ravel()[idx] = x.ravel()[idx]
    np.testing.assert_array_equal(sp.to_dense(), want)
    assert sp.sorted
    flat = np.ravel_multi_index(tuple(sp.coords.T.astype(np.intp)), x.shape) if kk else np.array([])
    assert (np.diff(flat) > 0).all()


def test_sparse_value_dtype_and_bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.array([[0, 1.5, 0], [-2.25, 0, 0]], np.float32)
    for vd in (np.float16, ml_dtypes.bfloat16, np.float32):
        s = quant.sparse_from_dense(x, threshold=0, value_dtype=vd)
        sp = quant.parse_sparse(s)
        assert sp.values.dtype == np.dtype(vd)
        np.testing.assert_array_equal(sp.to_dense().astype(np.float32), x)
    with pytest.raises(UnsupportedDType):
        quant.sparse_from_dense(x.astype(np.float64), threshold=0)


def test_sparse_from_dense_argument_errors():
    x = np.ones((2, 2), np.float32)
    with pytest.raises(ValueError):
        quant.sparse_from_dense(x)
    with pytest.raises(ValueError):
        quant.sparse_from_dense(x, threshold=0, top_k=1)
    with pytest.raises(ValueError):
        quant.sparse_from_dense(np.float32(1), threshold=0)


def test_sparse_empty():
    x = np.zeros((4, 5), np.float32)
    s = quant.sparse_from_dense(x, threshold=0)
    assert s.nbytes == 8
    sp = quant.parse_sparse(resonant.decode(resonant.encode(resonant.Think(s))).hidden)
    assert len(sp.values) == 0 and sp.coords.shape == (0, 2)
    np.testing.assert_array_equal(sp.to_dense(), x)


def test_sparse_from_scipy():
    sparse = pytest.importorskip("scipy.sparse")
    rng = np.random.default_rng(9)
    dense = rng.standard_normal((20, 30)).astype(np.float32)
    dense[np.abs(dense) < 1.2] = 0
    for fmt in ("csr", "csc", "coo", "lil", "dok"):
        m = sparse.coo_matrix(dense).asformat(fmt)
        s = quant.sparse_from_scipy(m)
        assert s.shape == (20, 30)
        sp = quant.parse_sparse(resonant.decode(resonant.encode(resonant.Think(s))).hidden)
        assert sp.sorted
        flat = np.ravel_multi_index(tuple(sp.coords.T.astype(np.intp)), (20, 30))
        assert (np.diff(flat) > 0).all()
        np.testing.assert_array_equal(sp.to_dense(), m.toarray())
    arr = sparse.csr_array(dense)
    np.testing.assert_array_equal(quant.sparse_to_dense(quant.sparse_from_scipy(arr)), dense)


def test_sparse_from_scipy_sums_duplicates():
    """Repeated coordinates of a COO matrix mean their sum (scipy's meaning); the caller's matrix
    is left as it was. (Regression: they were kept, and to_dense took the last one.)"""
    sparse = pytest.importorskip("scipy.sparse")
    m = sparse.coo_matrix((np.array([1, 2, 3], np.float32), (np.array([0, 0, 1]), np.array([0, 0, 1]))),
                          shape=(2, 2))
    s = quant.sparse_from_scipy(m)
    np.testing.assert_array_equal(quant.sparse_to_dense(s), m.toarray())
    assert len(quant.parse_sparse(s).values) == 2
    assert m.nnz == 3  # not summed in place


def _sparse_payload(nnz, vd, flags, coords, values, zero=0) -> bytes:
    return (struct.pack("<IBBH", nnz, vd, flags, zero) + np.asarray(coords, "<u4").tobytes()
            + np.asarray(values).tobytes())


def test_sparse_malformed_payloads():
    shape = (4, 5)
    good = _sparse_payload(2, int(DType.F32), 1, [[0, 1], [3, 4]], np.array([1, 2], np.float32))
    sp = quant.parse_sparse(Slice(DType.SPARSE_COO_U32, shape, good))
    assert sp.to_dense()[3, 4] == 2

    def parse(p, shp=shape):
        return quant.parse_sparse(Slice(DType.SPARSE_COO_U32, shp, p))

    cases = {
        "nnz too large": (_sparse_payload(3, int(DType.F32), 1, [[0, 1], [3, 4]], np.array([1, 2], np.float32)),
                          SizeMismatch),
        "nnz too small": (_sparse_payload(1, int(DType.F32), 1, [[0, 1], [3, 4]], np.array([1, 2], np.float32)),
                          SizeMismatch),
        "nnz huge": (_sparse_payload(2 ** 32 - 1, int(DType.F32), 1, [[0, 1]], np.array([1], np.float32)),
                     SizeMismatch),
        "value dtype Q8_0": (_sparse_payload(2, int(DType.Q8_0), 1, [[0, 1], [3, 4]], np.array([1, 2], np.float32)),
                             UnsupportedDType),
        "value dtype 0": (_sparse_payload(1, 0, 1, [[0, 1]], np.array([1], np.float32)), UnsupportedDType),
        "value dtype 0xff": (_sparse_payload(1, 0xFF, 1, [[0, 1]], np.array([1], np.float32)), UnsupportedDType),
        "value size mismatch": (_sparse_payload(2, int(DType.F16), 1, [[0, 1], [3, 4]],
                                                np.array([1, 2], np.float32)), SizeMismatch),
        "row out of range": (_sparse_payload(1, int(DType.F32), 0, [[4, 0]], np.array([1], np.float32)),
                             SizeMismatch),
        "col out of range": (_sparse_payload(1, int(DType.F32), 0, [[0, 5]], np.array([1], np.float32)),
                             SizeMismatch),
        "coordinate 2^32-1": (_sparse_payload(1, int(DType.F32), 0, [[0, 2 ** 32 - 1]], np.array([1], np.float32)),
                              SizeMismatch),
        "truncated header": (good[:7], SizeMismatch),
        "truncated body": (good[:-1], SizeMismatch),
        "empty": (b"", SizeMismatch),
        "unknown flag": (_sparse_payload(1, int(DType.F32), 2, [[0, 1]], np.array([1], np.float32)), SizeMismatch),
        "reserved nonzero": (_sparse_payload(1, int(DType.F32), 0, [[0, 1]], np.array([1], np.float32), zero=1),
                             SizeMismatch),
    }
    for name, (payload, err) in cases.items():
        with pytest.raises(err):
            parse(payload)
    with pytest.raises(SizeMismatch):   # a zero-sized dimension has no valid coordinate
        parse(_sparse_payload(1, int(DType.F32), 0, [[0, 0]], np.array([1], np.float32)), (4, 0))
    with pytest.raises(UnsupportedDType):
        quant.parse_sparse(Slice.from_array(np.ones(3, np.float16)))


def test_sparse_malformed_payload_from_the_wire():
    """A peer's bad SPARSE_COO_U32 payload decodes (its size comes from slice_len alone) and
    parse_sparse rejects it with a resonant error."""
    bad = _sparse_payload(1, int(DType.F32), 0, [[9, 0]], np.array([1], np.float32))
    msg = resonant.decode(resonant.encode(resonant.Think(Slice(DType.SPARSE_COO_U32, (4, 5), bad))))
    with pytest.raises(SizeMismatch):
        quant.parse_sparse(msg.hidden)


@st.composite
def sparse_payloads(draw, max_dims=4):
    ndim = draw(st.integers(1, max_dims))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
    if draw(st.booleans()):  # plausible: a well-formed header, mutated
        nnz = draw(st.integers(0, 5))
        vd = draw(st.sampled_from([1, 2, 4, 5, 0, 3, 6, 17, 255]))
        flags = draw(st.sampled_from([0, 1, 2, 255]))
        vsize = {1: 2, 2: 1, 4: 2, 5: 4}.get(vd, 1)
        body_len = nnz * (4 * ndim + vsize) + draw(st.integers(-3, 3))
        coords = draw(st.binary(min_size=max(0, body_len), max_size=max(0, body_len)))
        if draw(st.booleans()):  # small coordinates, mostly in range
            coords = b"".join(struct.pack("<I", draw(st.integers(0, 7)))
                              for _ in range(len(coords) // 4)) + coords[len(coords) // 4 * 4:]
        payload = struct.pack("<IBBH", nnz, vd, flags, 0) + coords
    else:
        payload = draw(st.binary(max_size=200))
    return shape, payload


@given(case=sparse_payloads())
@settings(max_examples=500)
def test_parse_sparse_fuzz_raises_only_resonant_errors(case):
    shape, payload = case
    try:
        sp = quant.parse_sparse(Slice(DType.SPARSE_COO_U32, shape, payload))
    except ResonantError:
        return
    dense = sp.to_dense()
    assert dense.shape == shape
    assert len(sp.values) <= max(1, len(payload))
    if len(sp.values):
        assert (sp.coords < np.array(shape, np.uint64)).all()


def test_parse_sparse_zero_dim_with_two_nonzeros():
    """A 0-d payload has no coordinates, so only nnz can be wrong: more than one nonzero in one
    element is a resonant error. (Regression: it parsed, and to_dense raised numpy's ValueError.)"""
    payload = _sparse_payload(2, int(DType.F32), 0, np.zeros((2, 0)), np.array([1, 2], np.float32))
    # (a 0-D frame as an older resonant peer sent it: resonant's encoder refuses 0-D, issue 16)
    msg = resonant.decode(refcodec.encode(refcodec.from_frame(resonant.Think(Slice(DType.SPARSE_COO_U32, (), payload)))))
    with pytest.raises(SizeMismatch):
        quant.parse_sparse(msg.hidden)
    with pytest.raises(SizeMismatch):  # 21 nonzeros in a (4, 5) tensor: also too many
        quant.parse_sparse(Slice(DType.SPARSE_COO_U32, (4, 5), _sparse_payload(
            21, int(DType.F32), 0, np.zeros((21, 2)), np.ones(21, np.float32))))


def test_parse_sparse_zero_dim_single_value():
    """(Regression: to_dense assigned a (1,) array to a 0-d one.)"""
    payload = _sparse_payload(1, int(DType.F32), 0, np.zeros((1, 0)), np.array([2.5], np.float32))
    sp = quant.parse_sparse(Slice(DType.SPARSE_COO_U32, (), payload))
    assert sp.to_dense() == F32(2.5)


# ====================================================================== critique


def _states(n=384, seed=10):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n).astype(np.float32)
    b = a + rng.standard_normal(n).astype(np.float32) * 0.1
    b[[3, 17, 250]] += np.array([2.0, -3.0, 1.5], np.float32)
    return a, b


@pytest.mark.parametrize("mode", [dict(threshold=0.5), dict(top_k=5), dict(top_k=0), dict(threshold=100.0)])
@pytest.mark.parametrize("dtype", [DType.F16, DType.F32])
def test_critique_is_consistent(mode, dtype):
    a, b = _states()
    div = crit.divergence(a, b)
    np.testing.assert_array_equal(div, b - a)
    mask = crit.divergence_mask(div, **mode)
    c = crit.critique(a, b, dtype=dtype, stream_id=4, frame_seq=2, **mode)
    assert isinstance(c, resonant.Critique)
    assert c.stream_id == 4 and c.frame_seq == 2
    assert c.divergence.dtype == dtype and c.divergence.shape == (a.size,)
    assert c.mask.dtype == DType.I8
    np.testing.assert_array_equal(c.mask.numpy(), mask)
    np.testing.assert_array_equal(c.divergence.numpy(), div.astype(c.divergence.numpy().dtype))
    doc = c.explanation.json()
    flagged = int(mask.sum())
    if "threshold" in mode:
        assert flagged == int((np.abs(div) > mode["threshold"]).sum())
    else:
        assert flagged == mode["top_k"]
        if flagged:
            assert np.abs(div[mask == 1]).min() >= np.abs(div[mask == 0]).max()
    corr = doc["suggested_correction"]
    assert corr["flagged"] == flagged == int(c.mask.numpy().sum())
    assert corr["op"] == "add"
    assert doc["magnitude"] == pytest.approx(float(np.linalg.norm(div)), abs=1e-6)
    # the divergence slice's own norm agrees within its dtype's rounding
    sent = c.divergence.numpy().astype(np.float64)
    assert doc["magnitude"] == pytest.approx(float(np.linalg.norm(sent)), rel=1e-3 if dtype == DType.F16 else 1e-6)
    assert doc["relative_magnitude"] == pytest.approx(float(np.linalg.norm(div) / np.linalg.norm(a)), abs=1e-6)
    assert corr["l2_after"] == pytest.approx(float(np.linalg.norm(np.where(mask == 1, 0, div))), abs=1e-5)
    dims = corr["dims"]
    assert len(dims) == min(flagged, 16)
    assert all(mask[i] == 1 for i in dims)
    mags = np.abs(div[dims])
    assert (np.diff(mags) <= 0).all()  # largest first
    assert str(flagged) in doc["note"]
    if flagged:
        assert str(dims[0]) in doc["note"]
    # the wire
    back = resonant.decode(resonant.encode(c))
    assert back == c
    assert back.explanation.json() == doc
    np.testing.assert_array_equal(back.mask.numpy(), mask)
    json.dumps(doc)  # plain JSON types


def test_critique_finds_the_planted_dimensions():
    a, b = _states()
    c = crit.critique(a, b, threshold=1.0)
    doc = c.explanation.json()
    assert doc["suggested_correction"]["dims"] == [17, 3, 250]
    assert "17, 3, 250" in doc["note"]
    corrected = a + np.where(c.mask.numpy() == 1, c.divergence.numpy().astype(np.float32), 0)
    assert np.abs(corrected - b).max() < 1.0


def test_critique_custom_note_and_2d_states():
    a, b = _states()
    c = crit.critique(a.reshape(12, 32), b.reshape(12, 32), top_k=3, note="dims 3 and 17")
    doc = c.explanation.json()
    assert doc["note"] == "dims 3 and 17"
    assert sorted(doc["suggested_correction"]["dims"]) == [3, 17, 250]
    assert c.divergence.shape == (384,)


def test_critique_argument_errors():
    a, b = _states()
    with pytest.raises(ValueError):
        crit.divergence(a, b[:-1])
    with pytest.raises(ValueError):
        crit.divergence_mask(b - a)
    with pytest.raises(ValueError):
        crit.divergence_mask(b - a, threshold=1, top_k=1)
    doc = crit.explain(np.zeros(4), np.zeros(4, np.float32), np.zeros(4, np.int8))
    assert doc["magnitude"] == 0 and doc["relative_magnitude"] is None
    assert doc["suggested_correction"]["dims"] == []


@pytest.mark.parametrize("dtype", [DType.Q8_0, DType.Q4_0])
def test_critique_quantized_divergence(dtype):
    """A quantized divergence slice (regression: a bare KeyError); dtypes without a meaning here
    raise UnsupportedDType."""
    a, b = _states()
    c = crit.critique(a, b, threshold=0.5, dtype=dtype)
    assert c.divergence.dtype == dtype
    div = b - a
    back = resonant.decode(resonant.encode(c))
    assert back == c
    got = quant.to_float(back.divergence)
    step = np.abs(div).max() / (127 if dtype == DType.Q8_0 else 8)
    assert np.abs(got - div).max() <= step  # within one quantization step (see the bounds above)
    assert back.explanation.json()["magnitude"] == pytest.approx(float(np.linalg.norm(div)), abs=1e-6)


@pytest.mark.parametrize("dtype", [DType.SPARSE_COO_U32, DType.Q4, DType.SPARSE_COO])
def test_critique_rejects_dtypes_without_a_dense_vector(dtype):
    a, b = _states()
    with pytest.raises(UnsupportedDType):
        crit.critique(a, b, threshold=0.5, dtype=dtype)


# ====================================================================== tensors beyond one frame


def test_quantize_a_tensor_larger_than_one_frame_and_stream_it():
    """A Slice may be larger than a frame (a V-Stream object); a message may not. (Regression:
    quantize() of more than 61,664 values raised EncodeError.)"""
    x = np.random.default_rng(11).standard_normal((128, 4096)).astype(np.float32)
    s = quant.quantize(x, "q8_0")
    assert s.nbytes == 128 * 4096 // 32 * 34
    r = resonant.Reassembler()
    events = [e for data in resonant.StreamSender(21, [s]) for e in r.receive(data, now=0.0)]
    assert isinstance(events[-1], resonant.StreamComplete)
    assert events[-1].objects[0].tobytes() == s.tobytes()
    back = Slice(DType.Q8_0, x.shape, events[-1].objects[0])
    assert_same_f32(quant.dequantize(back), quant.dequantize(s))
    with pytest.raises(EncodeError, match="max_frame_bytes"):  # but no message carries it
        resonant.encode(resonant.Think(s))
    big = quant.sparse_from_dense(x, threshold=1.0)  # ~1/3 of 512 Ki values: ~1.7 MB
    np.testing.assert_array_equal(quant.sparse_to_dense(big), _thresholded(x, 1.0))


def test_choose_on_a_state_larger_than_one_frame():
    """(Regression: F16 of a (119, 384) state is 91,392 bytes, and choose() raised EncodeError.)"""
    x = np.random.default_rng(12).standard_normal((119, 384)).astype(np.float32)
    c = quant.choose(x, min_cosine=0.999999)
    assert c.dtype == DType.F16


# ====================================================================== undefined C behaviour


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_tiny_block_codes_are_defined(kind):
    """max|x| < ~3.7e-37: d is a float32 subnormal and 1/d overflows; x*id is inf or NaN, whose
    conversion to int8 C leaves undefined. resonant writes the codes ggml's x86 build writes (0),
    not what (int)inf happened to give (0x01 / 0xff). (Regression.)"""
    x = np.zeros(32, np.float32)
    x[:4] = [1e-38, -1e-38, 5e-39, 0.0]
    p = quant.quantize(x, kind).tobytes()
    if kind == "q8_0":
        assert p == bytes(34)                          # d = fp16(7.9e-41) = +0, codes 0
    else:
        assert p == b"\x00\x80" + bytes(16)            # d = fp16(-1.25e-39) = -0, nibbles 0
    assert check_against_reference(x, kind) == {0}
    assert not quant.dequantize(quant.quantize(x, kind)).any()
