"""Resonant: V-Frames for hidden states, KV caches, embeddings and control messages.

>>> import numpy as np, resonant
>>> frame = resonant.Think(np.zeros((1, 8), np.float16), stream_id=7)
>>> resonant.decode(resonant.encode(frame)) == frame
True
"""

try:
    from resonant import _codec
except ImportError:  # e.g. `python -c "import resonant"` in a fresh clone: its resonant/ shadows the installed one
    import importlib.util as _util
    import os as _os
    if _util.find_spec("resonant._codec") is not None:
        raise  # the codec is there but does not load: its own error says why
    raise ImportError(
        f"resonant: the compiled codec (resonant._codec) is not built in {_os.path.dirname(__file__)}: run "
        "`make compile` (or `pip install -e .`) in the checkout, or run Python from another directory to use "
        "the installed resonant") from None
from resonant._codec import (
    Frame,
    Slice,
    crc32,
    crc32_backend,
    xxh3_64,
    decode,
    encode,
    make_frame,
)
from resonant._codec import byte_shuffle, fast_paths
from resonant._spec import (
    VERSION_TRANSFORMED,
    Filters,
    MAX_DIMS,
    MAX_FRAME_BYTES,
    MAX_SLICES,
    MIN_FRAME_BYTES,
    VERSION,
    DType,
    Flags,
    Modality,
    MsgType,
)
from resonant.errors import *  # noqa: F401,F403
from resonant.errors import __all__ as _errors_all
from resonant._spec import MESSAGE_CLASSES as _MESSAGE_CLASSES

# Every message class the spec defines (schema/vframe.yaml, enums.msg_type), e.g. Think, Cache, Sync.
globals().update({_name: getattr(_codec, _name) for _name in _MESSAGE_CLASSES.values()})

__version__ = "0.1.0"

# Imported on first use (resonant.connect, resonant.Session, resonant.aio, ...): the sessions,
# streams and asyncio adapters are most of what `import resonant` would cost beyond numpy and the
# codec, and a program that only encodes and decodes frames needs none of them.
_LAZY_MODULES = {
    "resonant.aio": ("DeliveryFailed", "Peer", "Server", "connect", "serve"),
    "resonant.delivery": ("Delivery", "StreamDelivered", "StreamUndelivered"),
    "resonant.session": ("Agreement", "ConnectionBroken", "FrameRejected", "HandshakeComplete", "HandshakeFailed",
                         "MessageReceived", "RemoteError", "Session", "SessionConfig"),
    "resonant.reassembler": ("ObjectReady", "Reassembler", "StreamComplete", "StreamFailed", "StreamStarted"),
    "resonant.stream_limits": ("MemoryBudget", "StreamLimits"),
    "resonant.stream_sender": ("StreamSender",),
    "resonant.transforms": ("Codec", "Key", "Keyring"),
    "resonant.space": ("ModelSignature", "space_hash32"),
    "resonant.kv": ("KVLayerReceived", "KVCacheReceived"),
}
_LAZY = {name: module for module, names in _LAZY_MODULES.items() for name in names}


def __getattr__(name: str):
    import importlib
    import importlib.util
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"resonant.{name}") is not None:
        return importlib.import_module(f"resonant.{name}")  # a submodule (resonant.aio, resonant.stream, ...)
    raise AttributeError(f"module 'resonant' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *(m.rsplit(".", 1)[1] for m in _LAZY_MODULES), "stream"})


__all__ = [
    *_MESSAGE_CLASSES.values(), "Frame", "Slice",
    "StreamSender", "Reassembler", "StreamLimits", "MemoryBudget", "StreamStarted", "ObjectReady", "StreamComplete", "StreamFailed",
    "decode", "encode", "make_frame", "crc32", "crc32_backend", "xxh3_64", "byte_shuffle", "fast_paths",
    "Codec", "Key", "Keyring", "ModelSignature", "space_hash32", "KVLayerReceived", "KVCacheReceived",
    "connect", "serve", "Peer", "Server", "Session", "SessionConfig", "Agreement",
    "Delivery", "DeliveryFailed", "StreamDelivered", "StreamUndelivered",
    "HandshakeComplete", "HandshakeFailed", "MessageReceived", "FrameRejected", "RemoteError", "ConnectionBroken",
    "DType", "Filters", "Flags", "Modality", "MsgType",
    "MAX_DIMS", "MAX_FRAME_BYTES", "MAX_SLICES", "MIN_FRAME_BYTES", "VERSION", "VERSION_TRANSFORMED",
    *_errors_all,
]
