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
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from resonant.errors import HandshakeError

__all__ = ["space_hash32", "ModelSignature"]

# torch dtype names as the handshake's short dtype names (ModelSignature.dtype)
_SHORT_DTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


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

    @classmethod
    def from_hf(cls, model: Any, tokenizer: Any = None, model_id: str | None = None,
                revision: str | None = None) -> "ModelSignature":
        """The signature of a Hugging Face transformers model (its config: num_hidden_layers,
        hidden_size, num_key_value_heads, head_dim or hidden_size / num_attention_heads; its
        parameters' dtype) and of its tokenizer (a SHA-256 of the vocabulary, token -> id, sorted;
        "" without one). model_id: by default the config's name_or_path (a local path: its last
        component, so that two machines with the model in different places agree); transformers
        does not keep the name of a GGUF file a model was read from, so pass model_id= (e.g. that
        file's name) for one. revision: by default the config's commit hash, or "".
        Imports nothing itself (torch and transformers are the caller's)."""
        config = getattr(model, "config", model)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers = getattr(text, "num_hidden_layers", None)
        hidden = getattr(text, "hidden_size", None)
        heads = getattr(text, "num_attention_heads", None)
        if not all(isinstance(v, int) and v > 0 for v in (layers, hidden, heads)):
            raise TypeError(f"{type(model).__name__}: its config lacks num_hidden_layers, hidden_size or "
                            "num_attention_heads (not a transformers decoder model?)")
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        if model_id is None:
            name = str(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "") or "")
            model_id = os.path.basename(name.rstrip("/\\")) if os.path.isabs(name) or os.path.exists(name) else name
        if revision is None:
            revision = str(getattr(config, "_commit_hash", None) or "")
        dtype = getattr(model, "dtype", None) or getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
        dtype_name = str(dtype).removeprefix("torch.")
        dtype_name = _SHORT_DTYPE.get(dtype_name, dtype_name)
        tok_hash = ""
        if tokenizer is not None:
            vocab = tokenizer.get_vocab()
            h = hashlib.sha256()
            for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
                h.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
            tok_hash = h.hexdigest()
        return cls(model_id=model_id, revision=revision, dtype=dtype_name, num_layers=layers, hidden_size=hidden,
                   num_kv_heads=kv_heads, head_dim=head_dim, tokenizer_hash=tok_hash)

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
