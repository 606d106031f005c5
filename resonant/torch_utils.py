"""torch tensors and Hugging Face KV caches in and out of V-Frames (`pip install '.[torch]'`).

    s = resonant.torch_utils.to_slice(t)                 # float16 / bfloat16 / float32 CPU tensor
    frame = resonant.Think(s)
    t2 = resonant.torch_utils.to_torch(frame.hidden)     # a tensor over the received bytes, no copy

    sender = resonant.torch_utils.kv_stream(stream_id, past_key_values)   # DynamicCache or legacy tuple
    ...                                                                   # send its frames
    cache = resonant.torch_utils.kv_from_stream(complete_event, layout)    # a DynamicCache again

bfloat16 crosses as bfloat16 (2 bytes, never widened): numpy sees it through ml_dtypes, torch
through a reinterpreting view. Received tensors are read-only views of the frame or stream
buffer (DLPack); clone() one before writing to it.
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_dtypes
import numpy as np

from resonant._codec import Cache, Slice
from resonant._spec import DType, MsgType
from resonant.errors import EncodeError, UnsupportedDType
from resonant.quant import dequantize
from resonant.stream_layout import StreamLayout
from resonant.stream_sender import StreamSender

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("resonant.torch_utils needs torch: pip install torch==2.13.0 first, then "
                      "pip install '.[torch]'") from exc

__all__ = ["to_numpy", "to_slice", "to_torch", "kv_layers", "kv_stream", "kv_from_arrays", "kv_from_stream",
           "kv_messages", "kv_from_messages", "kv_objects", "kv_tensor", "dynamic_cache"]

_TORCH_TO_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.int8: np.int8}


def to_numpy(t: "torch.Tensor") -> np.ndarray:
    """A numpy view of a CPU tensor (float16, bfloat16, float32, int8); copies only when the
    tensor is not contiguous or not on the CPU."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype not in _TORCH_TO_NUMPY:
        raise UnsupportedDType("tensor", f"{t.dtype} is not sent as is; convert to float16, bfloat16 or float32")
    return t.numpy()


def to_slice(t: "torch.Tensor") -> Slice:
    """A Slice over the tensor's memory (no copy until the frame is encoded)."""
    return Slice.from_array(to_numpy(t))


def to_torch(x: Slice | np.ndarray) -> "torch.Tensor":
    """A tensor over a received slice (or array) without a copy; Q8_0 / Q4_0 are dequantized
    to float32 (that is the one copy they need)."""
    if isinstance(x, Slice):
        if x.dtype in (DType.Q8_0, DType.Q4_0):
            return torch.from_numpy(dequantize(x))
        x = x.numpy()
    arr = np.asarray(x)
    if arr.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_dlpack(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(arr)


# ------------------------------------------------------------------ Hugging Face KV caches


def kv_layers(cache: Any) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
    """Per-layer (keys, values) of a transformers DynamicCache (any recent layout) or of a
    legacy tuple ((k0, v0), (k1, v1), ...)."""
    if isinstance(cache, (tuple, list)):
        out = []
        for i, kv in enumerate(cache):
            if not (isinstance(kv, (tuple, list)) and len(kv) >= 2):
                raise TypeError(f"cache[{i}]: expected (keys, values)")
            out.append((kv[0], kv[1]))
        return out
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56: cache.layers[i].keys / .values
        return [(layer.keys, layer.values) for layer in layers if getattr(layer, "keys", None) is not None]
    if hasattr(cache, "key_cache"):  # older DynamicCache
        return list(zip(cache.key_cache, cache.value_cache))
    if hasattr(cache, "to_legacy_cache"):
        return kv_layers(cache.to_legacy_cache())
    raise TypeError(f"{type(cache).__name__} is not a KV cache this function knows")


def kv_stream(stream_id: int, cache: Any, **kwargs: Any) -> StreamSender:
    """A V-Stream (message type Cache) of a KV cache, layer by layer: objects l{i}.keys and
    l{i}.values tagged with their layer, so the receiver can start on layer 0 while the
    others arrive. Tensors are views (no copy until each frame is encoded)."""
    objects, names, layers = [], [], []
    for i, (k, v) in enumerate(kv_layers(cache)):
        objects += [to_numpy(k), to_numpy(v)]
        names += [f"l{i}.keys", f"l{i}.values"]
        layers += [i, i]
    kwargs.setdefault("msg_type", MsgType.CACHE)
    return StreamSender(stream_id, objects, names=names, layers=layers, **kwargs)


def kv_from_arrays(arrays: Sequence[np.ndarray], *, legacy: bool = False) -> Any:
    """A DynamicCache (or, with legacy=True, the tuple of (K, V) per layer) from the arrays
    of a KV stream (keys, values, keys, values, ...), as tensors over them (no copy)."""
    if len(arrays) % 2:
        raise ValueError(f"{len(arrays)} arrays: a KV cache needs keys and values per layer")
    pairs = tuple((to_torch(arrays[i]), to_torch(arrays[i + 1])) for i in range(0, len(arrays), 2))
    if legacy:
        return pairs
    return dynamic_cache(pairs)


def dynamic_cache(pairs: Sequence[tuple["torch.Tensor", "torch.Tensor"]]) -> Any:
    """A transformers DynamicCache holding these (keys, values) per layer: the tensors themselves
    (no copy) where the Cache layout allows."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(pairs):
        if k.dim() >= 2 and v.dim() >= 2:
            cache.update(k[..., :0, :], v[..., :0, :], i)  # creates layer i (with its dtype and device)
            layers = getattr(cache, "layers", None)
            if layers is not None and hasattr(layers[i], "keys"):
                # Hand the layer our tensors rather than a torch.cat copy of them. DynamicCache
                # only ever concatenates onto them (a new tensor), never writes into them.
                layers[i].keys, layers[i].values = k, v
                continue
        cache.update(k, v, i)  # an older Cache layout: it keeps a copy
    return cache


def kv_objects(cache: Any, *, signature: Any = None, dtype: str | None = None) -> tuple[list, list, list, Any]:
    """What a KV stream of `cache` sends: (objects, names, layers, kv), kv the HEAD's metadata
    (resonant.kv.KVInfo). dtype: None sends the tensors as they are (float32, float16, bfloat16);
    "f32", "f16", "bf16" convert them (a copy unless already so); "q8_0", "q4_0" quantize them
    (resonant.quant, from float32). seq_len is the cache's get_seq_length()."""
    from resonant import kv as _kv
    from resonant.quant import quantize

    pairs = kv_layers(cache)
    if not pairs:
        raise EncodeError("cache", "the KV cache has no layers")
    src = pairs[0][0].dtype
    torch_name = str(src).removeprefix("torch.")
    if torch_name not in _kv.TORCH_DTYPES:
        raise UnsupportedDType("cache", f"{src}: a KV cache is sent from float32, float16 or bfloat16 tensors")
    wire = _kv.SAME_WIRE[torch_name] if dtype is None else str(dtype).lower()
    if wire not in _kv.WIRE_DTYPES:
        raise UnsupportedDType("dtype", f"{dtype!r}: expected None (as is) or one of {', '.join(_kv.WIRE_DTYPES)}")
    target = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}.get(wire, torch.float32)
    objects, names, layers = [], [], []
    for i, pair in enumerate(pairs):
        for t, part in zip(pair, ("keys", "values")):
            if t.dtype != src:
                raise EncodeError(f"cache[{i}].{part}", f"{t.dtype}, but layer 0 is {src}: one dtype for the whole cache")
            t = t.detach()
            if t.dtype != target:
                t = t.to(target)
            objects.append(quantize(to_numpy(t), wire) if wire in _kv.QUANTIZED else to_numpy(t))
            names.append(f"l{i}.{part}")
            layers.append(i)
    seq = cache.get_seq_length() if hasattr(cache, "get_seq_length") else pairs[0][0].shape[-2]
    return objects, names, layers, _kv.KVInfo(len(pairs), int(seq), torch_name, wire, signature)


def kv_tensor(array: np.ndarray, shape: Sequence[int], wire: str, torch_dtype: str) -> "torch.Tensor":
    """One received object of a KV stream as a tensor of the sender's torch dtype: a view of the
    received bytes when the wire dtype carries it as it is, else converted (q8_0 / q4_0 dequantized
    to float32 first)."""
    if wire in ("q8_0", "q4_0"):
        from resonant._spec import DTYPE_OF_WIRE_NAME

        t = torch.from_numpy(dequantize(Slice(DTYPE_OF_WIRE_NAME[wire], tuple(shape), array)))
    else:
        t = to_torch(array)
    want = getattr(torch, torch_dtype)
    return t if t.dtype == want else t.to(want)


def kv_from_stream(event: Any, layout: StreamLayout | None = None, *, legacy: bool = False) -> Any:
    """The KV cache of a completed stream (a StreamComplete, with the StreamStarted layout to
    check that it is one)."""
    if layout is not None:
        if layout.msg_type != MsgType.CACHE:
            raise ValueError(f"stream {event.stream_id} carries message type {layout.msg_type}, not Cache")
        names = [o.name or "" for o in layout.objects]
        if any(not n.endswith((".keys", ".values")) for n in names):
            raise ValueError(f"stream {event.stream_id} is not a KV cache: objects {names[:4]}...")
    return kv_from_arrays(event.objects, legacy=legacy)


def kv_messages(cache: Any, *, stream_id: int = 0, **header: Any) -> list:
    """A small KV cache as Cache messages, one per layer (keys, values; frame_seq = layer).
    A layer that does not fit one frame raises EncodeError: send the cache with kv_stream()."""
    return [Cache(to_slice(k), to_slice(v), stream_id=stream_id, frame_seq=i, **header)
            for i, (k, v) in enumerate(kv_layers(cache))]


def kv_from_messages(messages: Sequence, *, legacy: bool = False) -> Any:
    """The KV cache of Cache messages (any order; frame_seq is the layer), as kv_from_arrays."""
    by_layer = {}
    for m in messages:
        if not isinstance(m, Cache):
            raise TypeError(f"expected Cache messages, got {type(m).__name__}")
        if m.frame_seq in by_layer:
            raise ValueError(f"layer {m.frame_seq} appears twice")
        if m.keys is None:  # (decoded liberally: slices that fit no Cache layout)
            raise ValueError(f"layer {m.frame_seq}: the message's slices are not (keys, values): {m.layout_reason}")
        by_layer[m.frame_seq] = m
    if sorted(by_layer) != list(range(len(by_layer))):
        raise ValueError(f"layers {sorted(by_layer)[:8]}...: expected 0..{len(by_layer) - 1}")
    arrays = []
    for i in range(len(by_layer)):
        arrays += [by_layer[i].keys.numpy(), by_layer[i].values.numpy()]
    return kv_from_arrays(arrays, legacy=legacy)
