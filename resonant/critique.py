"""Critique helpers: how one model's latent state differs from another's, packed as a Critique.

    c = resonant.critique.critique(mine, theirs, threshold=0.5)
    c.divergence.numpy(), c.mask.numpy(), c.explanation.json()
    # {"note": "3 of 384 dimensions differ by more than 0.5 (largest at 17, 3, 250)",
    #  "magnitude": 2.31, "suggested_correction": {"op": "add", "dims": [17, 3, 250], ...}}

The explanation follows the reference's Critique (`note`, `magnitude`) and adds
`suggested_correction`: add the divergence on the masked dimensions to move the state
toward the other's.
"""

from __future__ import annotations

import numpy as np

from resonant import _codec
from resonant._codec import Critique, Slice
from resonant._spec import DType, NUMPY_DTYPES
from resonant.errors import UnsupportedDType

__all__ = ["divergence", "divergence_mask", "explain", "critique"]

_MAX_LISTED = 16  # dimensions named in the explanation


def divergence(reference, other) -> np.ndarray:
    """other - reference, elementwise, in float32 (flattened: one value per dimension)."""
    a = np.asarray(reference, np.float32).ravel()
    b = np.asarray(other, np.float32).ravel()
    if a.shape != b.shape:
        raise ValueError(f"states of {a.size} and {b.size} values cannot be compared")
    return b - a


def divergence_mask(div: np.ndarray, *, threshold: float | None = None, top_k: int | None = None) -> np.ndarray:
    """int8 mask (1 = flagged) of the dimensions with |divergence| > threshold, or of the top_k largest."""
    d = np.abs(np.asarray(div, np.float32).ravel())
    if (threshold is None) == (top_k is None):
        raise ValueError("give exactly one of threshold and top_k")
    if threshold is not None:
        return (d > threshold).astype(np.int8)
    mask = np.zeros(d.size, np.int8)
    k = max(0, min(int(top_k), d.size))
    if k:
        mask[np.argpartition(-d, k - 1)[:k]] = 1
    return mask


def explain(reference, div: np.ndarray, mask: np.ndarray, note: str | None = None) -> dict:
    """The explanation document: note, magnitude (L2 norm of the divergence), and the
    suggested correction (add the divergence on the flagged dimensions)."""
    div = np.asarray(div, np.float32).ravel()
    ref = np.asarray(reference, np.float32).ravel()
    flagged = np.flatnonzero(mask)
    order = flagged[np.argsort(-np.abs(div[flagged]), kind="stable")]
    magnitude = float(np.linalg.norm(div))
    norm = float(np.linalg.norm(ref))
    listed = [int(i) for i in order[:_MAX_LISTED]]
    if note is None:
        note = (f"{len(flagged)} of {div.size} dimensions flagged"
                + (f" (largest at {', '.join(map(str, listed[:3]))})" if listed else ""))
    return {
        "note": note,
        "magnitude": round(magnitude, 6),
        "relative_magnitude": round(magnitude / norm, 6) if norm else None,
        "suggested_correction": {
            "op": "add",
            "target": "masked dimensions of the divergence slice",
            "dims": listed,
            "flagged": int(len(flagged)),
            "l2_after": round(float(np.linalg.norm(np.where(mask.astype(bool), 0.0, div))), 6),
        },
    }


def critique(reference, other, *, threshold: float | None = None, top_k: int | None = None,
             note: str | None = None, dtype=DType.F16, **header) -> Critique:
    """A Critique of `other` against `reference`: the divergence vector (as dtype, F16 by
    default), the mask of flagged dimensions, and the explanation JSON."""
    div = divergence(reference, other)
    mask = divergence_mask(div, threshold=threshold, top_k=top_k)
    doc = explain(reference, div, mask, note)
    d = DType(dtype)
    if d in (DType.Q8_0, DType.Q4_0):
        from resonant.quant import quantize
        payload = quantize(div, d)
    elif d in NUMPY_DTYPES:
        payload = Slice.from_array(div.astype(_codec.numpy_dtype(d)), dtype=d)
    else:
        raise UnsupportedDType("dtype", f"{d.name} cannot carry a divergence vector")
    return Critique(payload, mask, doc, **header)
