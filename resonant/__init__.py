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
from resonant.space import ModelSignature, space_hash32
from resonant.reassembler import ObjectReady, Reassembler, StreamComplete, StreamFailed, StreamStarted
from resonant.stream_limits import MemoryBudget, StreamLimits
from resonant.stream_sender import StreamSender
from resonant.transforms import Codec, Key, Keyring
from resonant.session import (
    Agreement,
    ConnectionBroken,
    FrameRejected,
    HandshakeComplete,
    HandshakeFailed,
    MessageReceived,
    RemoteError,
    Session,
    SessionConfig,
)
from resonant import stream  # noqa: F401  (resonant.stream.X works after `import resonant`, as before the split)
from resonant.errors import __all__ as _errors_all
from resonant._spec import MESSAGE_CLASSES as _MESSAGE_CLASSES

# Every message class the spec defines (schema/vframe.yaml, enums.msg_type), e.g. Think, Cache, Sync.
globals().update({_name: getattr(_codec, _name) for _name in _MESSAGE_CLASSES.values()})

__version__ = "0.1.0"

# The asyncio adapters are imported on first use (resonant.connect, resonant.aio, ...): asyncio is
# a good part of what `import resonant` would cost, and the sans-IO core needs none of it.
_LAZY = {"Peer": "resonant.aio", "Server": "resonant.aio", "connect": "resonant.aio", "serve": "resonant.aio"}


def __getattr__(name: str):
    import importlib
    if name == "aio":
        return importlib.import_module("resonant.aio")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'resonant' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "aio"})


__all__ = [
    *_MESSAGE_CLASSES.values(), "Frame", "Slice",
    "StreamSender", "Reassembler", "StreamLimits", "MemoryBudget", "StreamStarted", "ObjectReady", "StreamComplete", "StreamFailed",
    "decode", "encode", "make_frame", "crc32", "crc32_backend", "xxh3_64", "byte_shuffle", "fast_paths",
    "Codec", "Key", "Keyring", "ModelSignature", "space_hash32",
    "connect", "serve", "Peer", "Server", "Session", "SessionConfig", "Agreement",
    "HandshakeComplete", "HandshakeFailed", "MessageReceived", "FrameRejected", "RemoteError", "ConnectionBroken",
    "DType", "Filters", "Flags", "Modality", "MsgType",
    "MAX_DIMS", "MAX_FRAME_BYTES", "MAX_SLICES", "MIN_FRAME_BYTES", "VERSION", "VERSION_TRANSFORMED",
    *_errors_all,
]
