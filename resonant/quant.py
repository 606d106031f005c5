"""Quantized and sparse tensors: ggml-compatible Q8_0 / Q4_0, an adaptive choice of dtype
under an error budget, and SparseCoo with a specified layout.

    s = resonant.quant.quantize(hidden, "q8_0")        # a Slice: ggml blocks, the shape kept
    x = resonant.quant.dequantize(s)                   # float32, the original shape
    choice = resonant.quant.choose(hidden, min_cosine=0.999)   # every token (row) >= 0.999
    choice.dtype, choice.cosine, choice.cosine_row, choice.nbytes  # what it picked, the worst token and where

The Q8_0 / Q4_0 kernels are C (in the codec extension), with ggml's reference formulas and
rounding, so llama.cpp's dequantize_row_q8_0 / _q4_0 read the payloads byte for byte.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from resonant import _codec
from resonant._codec import Slice
from resonant._spec import DTYPE_OF_WIRE_NAME, MAX_DENSE_BYTES, NUMPY_DTYPES, DType
from resonant.errors import LimitExceeded, SizeMismatch, UnsupportedDType

__all__ = ["quantize", "dequantize", "to_float", "Choice", "choose", "error_of", "row_errors",
           "sparse_from_dense", "sparse_from_scipy", "sparse_to_dense", "SparseCoo", "parse_sparse"]

_KIND = {DType.Q8_0: 8, DType.Q4_0: 4}


def _float_like(name: str) -> bool:
    try:
        return np.dtype(name).kind in "fV"  # (ml_dtypes' bfloat16 is of kind V)
    except TypeError:  # one numpy knows only through ml_dtypes (bfloat16), not imported until used
        return True


# The dtypes this module converts between, by their wire names (the spec's): the block-quantized
# ones above and every float dtype numpy holds (F16, BF16, F32).
_NAMES = {name: d for name, d in DTYPE_OF_WIRE_NAME.items()
          if d in _KIND or (d in NUMPY_DTYPES and _float_like(NUMPY_DTYPES[d]))}


def _dtype(d) -> DType:
    if isinstance(d, str):
        try:
            return _NAMES[d.lower()]
        except KeyError:
            raise UnsupportedDType("dtype", f"{d!r}: expected one of {', '.join(_NAMES)}") from None
    return DType(d)


def quantize(x, dtype="q8_0") -> Slice:
    """A Slice of x's values (C order) as Q8_0 or Q4_0 blocks, with x's shape."""
    d = _dtype(dtype)
    if d not in _KIND:
        raise UnsupportedDType("dtype", f"{d.name} is not a quantized dtype (Q8_0, Q4_0)")
    arr = np.asarray(x)
    return Slice(d, arr.shape, _codec.quantize_blocks(arr, _KIND[d]))


def dequantize(s: Slice) -> np.ndarray:
    """float32 values of a Q8_0 / Q4_0 slice, in its shape."""
    if s.dtype not in _KIND:
        raise UnsupportedDType("dtype", f"{DType(s.dtype).name} is not a quantized dtype (Q8_0, Q4_0)")
    n = math.prod(s.shape)
    return _codec.dequantize_blocks(s.payload, n, _KIND[s.dtype]).reshape(s.shape)


def to_float(s: Slice) -> np.ndarray:
    """Any dense slice as an array: quantized ones dequantized to float32, the others a view."""
    if s.dtype in _KIND:
        return dequantize(s)
    return s.numpy()


# ------------------------------------------------------------------ adaptive choice


@dataclass(frozen=True)
class Choice:
    """What choose() picked: the dtype, its slice, the error it measured, and every candidate
    it tried, smallest first.

    The errors are the relative L2 error ||x - x'|| / ||x||, the max relative error
    max|x - x'| / max|x| and the cosine similarity. With per_row=True (choose()'s default)
    rel_error, max_rel_error and cosine are the WORST row's (the highest errors, the lowest
    cosine: what the budget was checked against), each measured within its row, and
    rel_error_row / max_rel_error_row / cosine_row say which row (an index into x.shape[:-1];
    () for a 1-D array); worst_row is the row that came closest to its bound. The
    array_rel_error / array_max_rel_error / array_cosine are the same figures over the whole
    array (per_row=False: those are the ones checked, and rel_error == array_rel_error ...,
    the rows are None)."""

    dtype: DType
    slice: Slice
    rel_error: float
    max_rel_error: float
    cosine: float
    nbytes: int
    tried: tuple[tuple[str, int, float, float, float], ...]  # (dtype, bytes, rel_error, max_rel_error, cosine)
    per_row: bool = False
    rel_error_row: tuple[int, ...] | None = None
    max_rel_error_row: tuple[int, ...] | None = None
    cosine_row: tuple[int, ...] | None = None
    worst_row: tuple[int, ...] | None = None
    array_rel_error: float = 0.0
    array_max_rel_error: float = 0.0
    array_cosine: float = 1.0


def error_of(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(relative L2 error, max relative error, cosine similarity) of y as an approximation of x,
    over the whole array (row_errors() gives them per row)."""
    a = np.asarray(x, np.float64).ravel()
    b = np.asarray(y, np.float64).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    diff = a - b
    rel = float(np.linalg.norm(diff)) / na if na else float(np.linalg.norm(diff) > 0)
    amax = float(np.abs(a).max()) if a.size else 0.0
    mrel = float(np.abs(diff).max()) / amax if amax else (float(np.abs(diff).max() > 0) if a.size else 0.0)
    cos = float(a @ b) / (na * nb) if na and nb else (1.0 if na == nb else 0.0)
    return rel, mrel, cos


def row_errors(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """error_of() of every row: three float64 arrays of shape x.shape[:-1] (relative L2 error,
    max relative error, cosine), row i measuring y[i] against x[i], a row being the last axis
    (one token's vector of a (tokens, dim) state; one head's vector of one token of a
    (batch, heads, seq, head_dim) KV tensor). A 1-D array is one row (shape ()); a 0-d one too.
    Vectorized; the edge cases (a zero row) as error_of's."""
    a = np.asarray(x, np.float64)
    b = np.asarray(y, np.float64)
    if a.ndim == 0:
        a, b = a.reshape(1), b.reshape(1)
    if a.shape[-1] == 0:
        shape = a.shape[:-1]
        return np.zeros(shape), np.zeros(shape), np.ones(shape)
    diff = a - b
    na = np.sqrt(np.einsum("...i,...i->...", a, a))
    nb = np.sqrt(np.einsum("...i,...i->...", b, b))
    nd = np.sqrt(np.einsum("...i,...i->...", diff, diff))
    dot = np.einsum("...i,...i->...", a, b)
    amax = np.abs(a).max(axis=-1)
    dmax = np.abs(diff).max(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(na > 0, nd / np.where(na > 0, na, 1), (nd > 0).astype(np.float64))
        mrel = np.where(amax > 0, dmax / np.where(amax > 0, amax, 1), (dmax > 0).astype(np.float64))
        both = (na > 0) & (nb > 0)
        cos = np.where(both, dot / np.where(both, na * nb, 1), np.where(na == nb, 1.0, 0.0))
    return rel, mrel, cos


def _worst(rel: np.ndarray, mrel: np.ndarray, cos: np.ndarray):
    """The worst figure of each kind and its row (an index tuple into the rows' shape)."""
    def at(flat: int) -> tuple[int, ...]:
        return tuple(int(i) for i in np.unravel_index(flat, rel.shape))
    if rel.size == 0:
        return 0.0, 0.0, 1.0, None, None, None
    i, j, k = int(np.argmax(rel)), int(np.argmax(mrel)), int(np.argmin(cos))
    return (float(rel.flat[i]), float(mrel.flat[j]), float(cos.flat[k]), at(i), at(j), at(k))


def _closest_row(rels, mrels, coss, max_rel_error, max_abs_rel_error, min_cosine) -> tuple[int, ...]:
    """The row whose error comes closest to (or goes furthest over) its bound: the largest
    error / bound ((1 - cosine) / (1 - min_cosine) for the cosine) of the bounds given."""
    def ratio(err: np.ndarray, bound: float) -> np.ndarray:
        return err / bound if bound > 0 else np.where(err > 0, np.inf, 0.0)
    m = np.zeros(rels.shape)
    if max_rel_error is not None:
        m = np.maximum(m, ratio(rels, max_rel_error))
    if max_abs_rel_error is not None:
        m = np.maximum(m, ratio(mrels, max_abs_rel_error))
    if min_cosine is not None:
        m = np.maximum(m, ratio(1 - coss, 1 - min_cosine))
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(m)), rels.shape))


def _encode_as(x: np.ndarray, d: DType) -> Slice:
    if d in _KIND:
        return quantize(x, d)
    return Slice.from_array(np.ascontiguousarray(x.astype(_codec.numpy_dtype(d))), dtype=d)


def choose(x, *, max_rel_error: float | None = None, min_cosine: float | None = None,
           max_abs_rel_error: float | None = None,
           candidates: Sequence[str] = ("q4_0", "q8_0", "f16", "f32"), per_row: bool = True) -> Choice:
    """The smallest candidate whose error stays within the budget (every bound given must
    hold): max_rel_error bounds ||x - x'|| / ||x||, max_abs_rel_error bounds
    max|x - x'| / max|x|, min_cosine bounds the cosine similarity. The last candidate is
    taken when none fits (check the returned errors).

    per_row=True (the default): every bound must hold for EVERY row, a row being the last
    axis -- one token's vector of a (..., tokens, dim) state, one head's vector of one token
    of a (batch, kv_heads, seq, head_dim) KV tensor; a 1-D array is one row. The choice is
    made on the worst row, so no token is sent with more error than the budget (over the
    whole array, a few bad tokens hide among many good ones: MiniLM's states passed
    min_cosine=0.9999 as a whole with a token at 0.99989). per_row=False measures the whole
    array as one vector (the behaviour before per-row; a looser test). Choice says which row
    was worst and keeps the whole-array figures too."""
    if max_rel_error is None and min_cosine is None and max_abs_rel_error is None:
        raise ValueError("give an error budget: max_rel_error, max_abs_rel_error and/or min_cosine")
    arr = np.asarray(x)
    order = sorted((_dtype(c) for c in candidates), key=lambda d: _size_of(d, arr.size))

    tried = []
    best = None
    for d in order:
        s = _encode_as(arr, d)
        y = to_float(s)
        whole = error_of(arr, y)
        if per_row:
            rels, mrels, coss = row_errors(arr, y)
            rel, mrel, cos, r_rel, r_mrel, r_cos = _worst(rels, mrels, coss)
            rows = (r_rel, r_mrel, r_cos)
            worst = None if r_cos is None else _closest_row(rels, mrels, coss, max_rel_error, max_abs_rel_error,
                                                            min_cosine)
        else:
            rel, mrel, cos = whole
            rows, worst = (None, None, None), None
        tried.append((d.name, s.nbytes, rel, mrel, cos))
        best = (d, s, rel, mrel, cos, rows, worst, whole)
        if ((max_rel_error is None or rel <= max_rel_error) and (min_cosine is None or cos >= min_cosine)
                and (max_abs_rel_error is None or mrel <= max_abs_rel_error)):
            break
    d, s, rel, mrel, cos, rows, worst, whole = best
    return Choice(d, s, rel, mrel, cos, s.nbytes, tuple(tried), per_row, *rows, worst, *whole)


def _size_of(d: DType, n: int) -> int:
    if d == DType.Q8_0:
        return -(-n // 32) * 34
    if d == DType.Q4_0:
        return -(-n // 32) * 18
    return n * _codec.element_bytes(d)


# ------------------------------------------------------------------ sparse COO, specified layout

_SPARSE_HEAD = struct.Struct("<IBBH")  # nnz, value dtype, flags, zero
_SORTED = 1
_VALUE_DTYPES = (DType.F16, DType.BF16, DType.F32, DType.I8)


@dataclass(frozen=True)
class SparseCoo:
    """A parsed SPARSE_COO_U32 payload: coordinates (nnz, ndim) uint32 and values (nnz,),
    both views of the payload; `shape` is the dense shape."""

    shape: tuple[int, ...]
    coords: np.ndarray
    values: np.ndarray
    sorted: bool

    def to_dense(self, max_bytes: int = MAX_DENSE_BYTES) -> np.ndarray:
        """The dense array; its size (the dense shape's element count times the value size) is
        checked against max_bytes (default max_dense_bytes, 1 GiB) before it is allocated."""
        nbytes = math.prod(self.shape) * self.values.dtype.itemsize
        if nbytes > max_bytes:
            raise LimitExceeded("shape", f"a dense array of shape {self.shape} and {self.values.dtype} values takes "
                                f"{nbytes} bytes, more than max_bytes ({max_bytes})")
        out = np.zeros(self.shape, self.values.dtype)
        if len(self.values):
            flat = np.ravel_multi_index(tuple(self.coords.T.astype(np.intp)), self.shape) if self.shape else \
                np.zeros(len(self.values), np.intp)
            out.reshape(-1)[flat] = self.values
        return out


def _sparse_slice(shape: tuple[int, ...], coords: np.ndarray, values: np.ndarray, is_sorted: bool) -> Slice:
    vd = next((d for d in _VALUE_DTYPES if _codec.numpy_dtype(d) == values.dtype), None)
    if vd is None:
        raise UnsupportedDType("values", f"{values.dtype} values: use float16, bfloat16, float32 or int8")
    head = _SPARSE_HEAD.pack(len(values), int(vd), _SORTED if is_sorted else 0, 0)
    payload = head + np.ascontiguousarray(coords, dtype="<u4").tobytes() + np.ascontiguousarray(values).tobytes()
    return Slice(DType.SPARSE_COO_U32, shape, payload)


def sparse_from_dense(x, *, threshold: float | None = None, top_k: int | None = None,
                      value_dtype=None) -> Slice:
    """A SPARSE_COO_U32 slice of x keeping |x| > threshold, or the top_k largest |x| (exactly
    one of the two); nonzeros in row-major order (sorted)."""
    arr = np.asarray(x)
    if (threshold is None) == (top_k is None):
        raise ValueError("give exactly one of threshold and top_k")
    if arr.ndim == 0 or arr.ndim > 8:
        raise ValueError(f"a sparse tensor needs 1 to 8 dimensions, got {arr.ndim}")
    flat = arr.reshape(-1)
    mag = np.abs(flat.astype(np.float32))
    if threshold is not None:
        idx = np.flatnonzero(mag > threshold)
    else:
        k = max(0, min(int(top_k), flat.size))
        idx = np.sort(np.argpartition(-mag, k - 1)[:k]) if k else np.empty(0, np.intp)
    values = flat[idx]
    if value_dtype is not None:
        values = values.astype(value_dtype)
    coords = np.stack(np.unravel_index(idx, arr.shape), axis=1) if len(idx) else np.empty((0, arr.ndim), np.intp)
    return _sparse_slice(arr.shape, coords, np.ascontiguousarray(values), True)


def sparse_from_scipy(m) -> Slice:
    """A SPARSE_COO_U32 slice of a scipy.sparse matrix or array (any format)."""
    coo = m.tocoo(copy=True)
    coo.sum_duplicates()  # scipy's meaning of repeated coordinates: their sum
    coords = np.stack([coo.row, coo.col], axis=1)
    order = np.lexsort((coo.col, coo.row))
    return _sparse_slice(tuple(coo.shape), coords[order], np.ascontiguousarray(coo.data[order]), True)


def parse_sparse(s: Slice) -> SparseCoo:
    """Check and parse a SPARSE_COO_U32 slice's payload (views, no copy)."""
    if s.dtype != DType.SPARSE_COO_U32:
        raise UnsupportedDType("dtype", f"{DType(s.dtype).name} has no specified layout (SPARSE_COO_U32 has)")
    p = s.payload
    if len(p) < _SPARSE_HEAD.size:
        raise SizeMismatch("payload", f"{len(p)} bytes, shorter than the 8-byte sparse header", 0)
    nnz, vd, flags, zero = _SPARSE_HEAD.unpack_from(p, 0)
    if vd not in [int(d) for d in _VALUE_DTYPES]:
        raise UnsupportedDType("payload.value_dtype", f"{vd:#04x} is not F16, BF16, F32 or I8")
    if flags & ~_SORTED or zero:
        raise SizeMismatch("payload.flags", f"unknown flag bits {flags:#04x} / reserved {zero}", 5)
    ndim = len(s.shape)
    vsize = _codec.element_bytes(vd)
    need = _SPARSE_HEAD.size + nnz * (4 * ndim + vsize)
    if need != len(p):
        raise SizeMismatch("payload", f"{nnz} nonzeros of {ndim} coordinates and {vsize}-byte values take {need} "
                           f"bytes, the payload has {len(p)}", 0)
    dense = math.prod(s.shape)
    if nnz > dense:
        raise SizeMismatch("payload.nnz", f"{nnz} nonzeros in a dense shape of {dense} elements", 0)
    coords = np.frombuffer(p, "<u4", nnz * ndim, _SPARSE_HEAD.size).reshape(nnz, ndim)
    values = np.frombuffer(p, _codec.numpy_dtype(vd), nnz, _SPARSE_HEAD.size + 4 * nnz * ndim)
    if nnz and (coords >= np.asarray(s.shape, np.uint64)).any():
        raise SizeMismatch("payload.coords", f"a coordinate is outside the dense shape {s.shape}", _SPARSE_HEAD.size)
    return SparseCoo(tuple(s.shape), coords, values, bool(flags & _SORTED))


def sparse_to_dense(s: Slice, max_bytes: int = MAX_DENSE_BYTES) -> np.ndarray:
    """The dense array of a SPARSE_COO_U32 slice. Its dense shape is the sender's choice: an
    array over max_bytes (default max_dense_bytes, 1 GiB) is refused with LimitExceeded before
    anything is allocated."""
    return parse_sparse(s).to_dense(max_bytes)
