"""Embedding-space identity: space_hash32 and a richer, versioned model signature.

space_hash32 is what the reference's capability handshake defines: the first 4 bytes,
read little-endian, of SHA-256 over ``"{space_id}:{arch}:{data_sig}"``. It travels in
every frame header and lets a receiver reject a frame from another embedding space at
once (``decode(..., expected_space_hash=h)`` raises SpaceMismatch). It is a 32-bit
discriminator against mistakes, not an authenticator.

ModelSignature carries what is needed to *explain* a mismatch (model, revision, dtype,
layer count, hidden size, KV heads, head dim, tokenizer hash); the handshake carries it as
``model_signature`` and ``ModelSignature.differences`` names the fields that disagree.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Any

from resonant.errors import HandshakeError

__all__ = ["space_hash32", "ModelSignature"]


def space_hash32(space_id: str, arch: str, data_sig: str) -> int:
    """The reference's space hash: SHA-256 of "{space_id}:{arch}:{data_sig}", first 4 bytes, little-endian."""
    for name, value in (("space_id", space_id), ("arch", arch), ("data_sig", data_sig)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    digest = hashlib.sha256(f"{space_id}:{arch}:{data_sig}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass(frozen=True)
class ModelSignature:
    """Who produced the tensors, in enough detail to explain a space mismatch (version 1)."""

    model_id: str
    revision: str
    dtype: str
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    tokenizer_hash: str
    version: int = 1

    @property
    def arch(self) -> str:
        """The architecture string: every shape-determining field."""
        return f"L{self.num_layers}-H{self.hidden_size}-KV{self.num_kv_heads}x{self.head_dim}-{self.dtype}"

    @property
    def data_sig(self) -> str:
        return f"{self.revision}:{self.tokenizer_hash}"

    def space_hash32(self) -> int:
        """space_hash32 with space_id = model_id, arch and data_sig derived from this signature."""
        return space_hash32(self.model_id, self.arch, self.data_sig)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> "ModelSignature":
        if not isinstance(doc, dict):
            raise HandshakeError("model_signature", f"expected an object, got {type(doc).__name__}")
        if doc.get("version") != 1:
            raise HandshakeError("model_signature.version", f"{doc.get('version')!r}: only version 1 is understood")
        values = {}
        for f in fields(cls):
            if f.name not in doc:
                raise HandshakeError(f"model_signature.{f.name}", "required field is missing")
            v = doc[f.name]
            want = int if f.type in ("int", int) else str
            if want is int and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise HandshakeError(f"model_signature.{f.name}", f"expected a non-negative integer, got {v!r}")
            if want is str and not isinstance(v, str):
                raise HandshakeError(f"model_signature.{f.name}", f"expected a string, got {type(v).__name__}")
            values[f.name] = v
        return cls(**values)

    def differences(self, other: "ModelSignature") -> dict[str, tuple[Any, Any]]:
        """Fields that differ: {name: (ours, theirs)}; empty when the signatures agree."""
        return {f.name: (getattr(self, f.name), getattr(other, f.name))
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)}

    def explain(self, other: "ModelSignature") -> str:
        diff = self.differences(other)
        if not diff:
            return "the model signatures agree"
        return "; ".join(f"{k}: ours {a!r}, theirs {b!r}" for k, (a, b) in diff.items())
