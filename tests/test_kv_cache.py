"""KV caches between processes: peer.send_kv_cache -> KVLayerReceived (layer by layer) and
KVCacheReceived (a ready DynamicCache), HEAD's kv checked, a receiver's model check (model_mismatch)."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import resonant  # noqa: E402
from resonant import DType, ModelSignature, MsgType  # noqa: E402
from resonant.aio import DeliveryFailed  # noqa: E402
from resonant.errors import EncodeError, HandshakeError, UnsupportedDType  # noqa: E402
from resonant.kv import KVCacheReceived, KVInfo, KVLayerReceived, KVReceiver  # noqa: E402
from resonant.reassembler import Reassembler, StreamComplete, StreamFailed, StreamStarted  # noqa: E402
from resonant.stream_layout import StreamLayout  # noqa: E402
from resonant.stream_sender import StreamSender  # noqa: E402
from resonant import torch_utils  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import _smollm2  # noqa: E402

PROMPT = 48  # tokens: with 1 KiB frames every tensor spans several chunks


class _Vocab:
    def __init__(self, n: int) -> None:
        self.vocab = {f"t{i}": i for i in range(n)}

    def get_vocab(self) -> dict:
        return dict(self.vocab)


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    return model, ids, ModelSignature.from_hf(model, _Vocab(256), model_id="tiny-llama")


@torch.no_grad()
def prefill(model, ids):
    out = model(ids, use_cache=True)
    return out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values, \
        out.logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def greedy(model, cache, nxt, n: int) -> list[int]:
    tokens = []
    for _ in range(n):
        out = model(nxt, cache=cache, use_cache=True)
        cache = out.cache
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(nxt))
    return tokens


async def _handoff(scheme: str, cache, *, server_kw=None, send_kw=None, max_frame_bytes=1024):
    """Send `cache` from a client to a server in this process; returns (server events for the stream,
    the send's result or exception)."""
    async with resonant.serve(f"{scheme}://127.0.0.1:0", max_frame_bytes=max_frame_bytes,
                              **(server_kw or {})) as server:
        host, port = server.address
        async with resonant.connect(f"{scheme}://{host}:{port}", max_frame_bytes=max_frame_bytes) as peer:
            send = asyncio.ensure_future(peer.send_kv_cache(cache, **(send_kw or {})))
            events = []
            while True:
                _, e = await server.next_event(timeout=10)
                if isinstance(e, (StreamStarted, KVLayerReceived, KVCacheReceived, StreamComplete, StreamFailed,
                                  resonant.ObjectReady)):
                    events.append(e)
                if isinstance(e, (KVCacheReceived, StreamFailed)):
                    break
            try:
                result = await asyncio.wait_for(send, 10)
            except Exception as exc:  # noqa: BLE001 - returned for the test to judge
                result = exc
            return events, result


# ------------------------------------------------------------------ over the transports


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_cache_continues_generation_identically(tiny, scheme):
    model, ids, sig = tiny
    cache, first = prefill(model, ids)
    want = greedy(model, copy.deepcopy(cache), first, 8)
    events, result = asyncio.run(_handoff(scheme, cache, send_kw={"signature": sig},
                                          server_kw={"expected_signature": sig}))
    assert isinstance(result, int)
    got = events[-1]
    assert isinstance(got, KVCacheReceived)
    assert (got.seq_len, got.layers, got.torch_dtype, got.wire_dtype) == (PROMPT, 4, "float32", "f32")
    assert got.signature == sig
    assert got.cache.get_seq_length() == PROMPT
    for (k, v), (k2, v2) in zip(torch_utils.kv_layers(cache), torch_utils.kv_layers(got.cache)):
        assert k2.dtype == torch.float32 and torch.equal(k, k2) and torch.equal(v, v2)
    # the cache holds the very tensors the layer events handed out: views of the received buffer
    layers = [e for e in events if isinstance(e, KVLayerReceived)]
    for e, (k, v) in zip(layers, torch_utils.kv_layers(got.cache)):
        assert k.data_ptr() == e.keys.data_ptr() and v.data_ptr() == e.values.data_ptr()
    assert greedy(model, got.cache, first, 8) == want  # exact for f32

    # layer by layer: every layer once, in order, the first before the stream completed
    kinds = [type(e).__name__ for e in events]
    assert [e.layer for e in layers] == [0, 1, 2, 3]
    assert kinds.index("KVLayerReceived") < kinds.index("StreamComplete")
    started = next(e for e in events if isinstance(e, StreamStarted))
    assert started.layout.chunks > 8 and started.layout.objects[0].chunks > 1  # more than a few frames
    assert not torch.equal(layers[0].keys, layers[1].keys)


def test_a_serve_handler_gets_the_kv_events_too(tiny):
    model, ids, sig = tiny
    cache, _ = prefill(model, ids)
    seen: list = []

    async def run():
        async with resonant.serve("tcp://127.0.0.1:0", handler=lambda addr, e: seen.append(e)) as server:
            host, port = server.address
            async with resonant.connect(f"tcp://{host}:{port}") as peer:
                await peer.send_kv_cache(cache, signature=sig)

    asyncio.run(run())
    assert [e.layer for e in seen if isinstance(e, KVLayerReceived)] == [0, 1, 2, 3]
    (done,) = [e for e in seen if isinstance(e, KVCacheReceived)]
    assert done.signature == sig and done.cache.get_seq_length() == PROMPT



def test_a_queued_kv_cache_stays_charged_to_max_memory_until_taken(tiny):
    # (review: a queued StreamComplete is charged to max_memory until the application takes it, but
    # the KVCacheReceived right behind it was not: taking the StreamComplete released the charge while
    # the cache (the same buffer, or ~7x its bytes dequantized from q4_0) still sat in the queue)
    model, ids, sig = tiny
    cache, _ = prefill(model, ids)
    f32 = sum(k.nbytes + v.nbytes for k, v in torch_utils.kv_layers(cache))

    async def run():
        async with resonant.serve("tcp://127.0.0.1:0", max_memory=1 << 30) as server:
            host, port = server.address
            async with resonant.connect(f"tcp://{host}:{port}") as peer:
                await peer.send_kv_cache(cache, signature=sig, dtype="q4_0")
                used = []
                while True:
                    _, e = await server.next_event(timeout=10)
                    used.append((type(e).__name__, server.budget.used))
                    if isinstance(e, KVCacheReceived):
                        return used, server.budget.used

    used, after = asyncio.run(run())
    (at_complete,) = [u for name, u in used if name == "StreamComplete"]
    assert at_complete >= f32  # the StreamComplete taken, the float32 cache still queued: charged
    assert after < f32 // 4  # taken: released


@pytest.mark.parametrize("wire, tol", [("bf16", 2e-2), ("f16", 2e-3), ("q8_0", 2e-2), ("q4_0", 0.2)])
def test_wire_dtypes_arrive_in_the_senders_dtype(tiny, wire, tol):
    model, ids, sig = tiny
    cache, _ = prefill(model, ids)
    events, result = asyncio.run(_handoff("tcp", cache, send_kw={"dtype": wire, "signature": sig}))
    assert isinstance(result, int)
    started = next(e for e in events if isinstance(e, StreamStarted))
    code = {"bf16": DType.BF16, "f16": DType.F16, "q8_0": DType.Q8_0, "q4_0": DType.Q4_0}[wire]
    assert {o.dtype for o in started.layout.objects} == {code}
    assert started.layout.kv.wire_dtype == wire
    got = events[-1]
    assert got.wire_dtype == wire and got.torch_dtype == "float32"
    for (k, v), (k2, v2) in zip(torch_utils.kv_layers(cache), torch_utils.kv_layers(got.cache)):
        assert k2.dtype == torch.float32 and k2.shape == k.shape
        for a, b in ((k, k2), (v, v2)):
            assert float((a - b).norm() / a.norm()) < tol


def test_bf16_cache_arrives_as_bf16_without_a_copy(tiny):
    model, ids, _ = tiny
    cache, _ = prefill(model, ids)
    pairs = [(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in torch_utils.kv_layers(cache)]
    bf = torch_utils.dynamic_cache(pairs)
    events, result = asyncio.run(_handoff("tcp", bf))
    assert isinstance(result, int)
    got = events[-1]
    assert (got.torch_dtype, got.wire_dtype, got.signature) == ("bfloat16", "bf16", None)
    for (k, v), (k2, v2) in zip(pairs, torch_utils.kv_layers(got.cache)):
        assert k2.dtype == torch.bfloat16 and torch.equal(k, k2) and torch.equal(v, v2)
    layer0 = next(e for e in events if isinstance(e, KVLayerReceived))
    assert layer0.keys.data_ptr() == torch_utils.kv_layers(got.cache)[0][0].data_ptr()


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_a_cache_of_another_model_is_refused_on_both_sides(tiny, scheme):
    model, ids, sig = tiny
    cache, _ = prefill(model, ids)
    theirs = dataclasses.replace(sig, model_id="another-model", tokenizer_hash="00")
    events, result = asyncio.run(_handoff(scheme, cache, send_kw={"signature": theirs},
                                          server_kw={"expected_signature": sig}))
    assert [type(e) for e in events] == [StreamFailed]  # refused at HEAD: never started, nothing allocated
    assert events[0].reason == "model_mismatch"
    assert "model_id" in events[0].detail and "tokenizer_hash" in events[0].detail
    assert isinstance(result, DeliveryFailed) and result.remote
    assert result.reason == "model_mismatch" and "another-model" in result.detail


def test_a_cache_naming_no_model_is_refused_by_a_receiver_that_declared_one(tiny):
    model, ids, sig = tiny
    cache, _ = prefill(model, ids)
    events, result = asyncio.run(_handoff("tcp", cache, server_kw={"expected_signature": sig}))
    assert events[0].reason == "model_mismatch" and "names no model" in events[0].detail
    assert isinstance(result, DeliveryFailed) and result.reason == "model_mismatch"


def test_model_mismatch_holds_no_memory_beyond_head(tiny):
    model, ids, sig = tiny
    cache, _ = prefill(model, ids)
    objects, kw = _kv_args(cache, dataclasses.replace(sig, revision="other"))
    sender = StreamSender(5, objects, **kw)
    r = Reassembler(expected_signature=sig)
    heads = sender.heads()
    assert len(heads) > 1  # (1 KiB frames: the HEAD goes in parts, each repeating kv)
    frames = list(sender)
    events = [e for h in heads for e in r.receive(h, 0.0)]
    assert [(type(e), e.reason) for e in events] == [(StreamFailed, "model_mismatch")]
    assert "revision" in events[0].detail
    assert r.buffered_bytes == 0 and r.open_streams == 0
    for f in frames[len(heads):]:
        assert r.receive(f, 0.0) == []  # dropped as frames of a closed stream
    assert r.buffered_bytes == 0



@pytest.mark.parametrize("wire, size", [("q4_0", 4), ("q8_0", 4), ("f16", 4), ("f32", 0)])
def test_a_cache_converted_on_arrival_is_charged_at_head(tiny, wire, size):
    # (review: a float32 cache sent as q4_0 is dequantized layer by layer into ~7x the wire bytes,
    # held until the stream completes; none of it counted against max_buffered_bytes or a budget)
    import math

    model, ids, sig = tiny
    cache, _ = prefill(model, ids)
    objects, kw = _kv_args(cache, sig, dtype=wire)
    sender = StreamSender(5, objects, **kw)
    layout = sender.layout
    converted = size * sum(math.prod(o.shape) for o in layout.objects)
    budget = resonant.MemoryBudget(layout.total_bytes + 16_384 + converted // 2)
    events = []
    r = Reassembler(budget=budget)
    for h in sender.heads():
        events += r.receive(h, 0.0)
    if size:  # too little room for what the receiver builds: refused at HEAD
        assert [(type(e), e.reason) for e in events] == [(StreamFailed, "limit")]
        assert budget.used == 0
    else:  # as is: the tensors are views of the buffer, nothing more to charge
        assert [type(e) for e in events] == [StreamStarted]
    r = Reassembler()
    for h in sender.heads():
        r.receive(h, 0.0)
    assert layout.total_bytes + converted <= r.buffered_bytes < layout.total_bytes + converted + 16_384


_RECEIVER = """
import asyncio, json, sys
import torch, resonant
from transformers import LlamaConfig, LlamaForCausalLM

async def main():
    async with resonant.serve("tcp://127.0.0.1:0", max_frame_bytes=4096) as server:
        print(server.address[1], flush=True)
        while True:
            _, e = await server.next_event(timeout=60)
            if isinstance(e, resonant.KVCacheReceived):
                break
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    cache, nxt, out = e.cache, torch.tensor([[int(sys.argv[1])]]), []
    with torch.no_grad():
        for _ in range(8):
            o = model(nxt, cache=cache, use_cache=True)
            cache, nxt = o.cache, o.logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(nxt))
    print(json.dumps({"tokens": out, "seq_len": e.seq_len, "dtype": str(e.cache.layers[0].keys.dtype)}), flush=True)

asyncio.run(main())
"""


@pytest.mark.slow  # (~10 s: the receiver imports torch and transformers)
def test_between_two_processes(tiny):
    import json
    import subprocess

    model, ids, sig = tiny
    cache, first = prefill(model, ids)
    want = greedy(model, copy.deepcopy(cache), first, 8)
    proc = subprocess.Popen([sys.executable, "-c", _RECEIVER, str(int(first))], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())

        async def send():
            async with resonant.connect(f"tcp://127.0.0.1:{port}", max_frame_bytes=4096) as peer:
                await peer.send_kv_cache(cache, signature=sig)

        asyncio.run(send())
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    got = json.loads(out)
    assert got == {"tokens": want, "seq_len": PROMPT, "dtype": "torch.float32"}


# ------------------------------------------------------------------ sans-IO and HEAD checks


def _kv_args(cache, sig=None, dtype=None):
    objects, names, layers, kv = torch_utils.kv_objects(cache, signature=sig, dtype=dtype)
    return objects, dict(names=names, layers=layers, kv=kv, max_frame_bytes=1024)


def test_sans_io_receiver_builds_the_cache(tiny):
    model, ids, sig = tiny
    cache, first = prefill(model, ids)
    want = greedy(model, copy.deepcopy(cache), first, 4)
    objects, kw = _kv_args(cache, sig)
    r, kvr = Reassembler(), KVReceiver()
    events = []
    for f in StreamSender(3, objects, **kw):
        events += kvr.expand(r.receive(f, 0.0))
    assert [e.layer for e in events if isinstance(e, KVLayerReceived)] == [0, 1, 2, 3]
    assert isinstance(events[-1], KVCacheReceived) and isinstance(events[-2], StreamComplete)
    assert greedy(model, events[-1].cache, first, 4) == want


def test_release_verified_hands_out_layers_only_with_the_verified_cache(tiny):
    model, ids, sig = tiny
    cache, _ = prefill(model, ids)
    objects, kw = _kv_args(cache, sig)
    r, kvr = Reassembler(resonant.StreamLimits(release="verified")), KVReceiver()
    events = []
    for f in StreamSender(3, objects, **kw):
        events += kvr.expand(r.receive(f, 0.0))
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("KVLayerReceived") == 4
    assert kinds.index("KVLayerReceived") > kinds.index("ObjectReady")
    assert kinds[-1] == "KVCacheReceived"


def _head(cache, sig=None, **kv_changes):
    objects, kw = _kv_args(cache, sig)
    doc = StreamSender(3, objects, **kw).layout.head_document()
    doc["kv"].update(kv_changes)
    return doc


@pytest.mark.parametrize("change, path", [
    (lambda d: d["kv"].update(layers=3), "head.kv.layers"),
    (lambda d: d["kv"].update(layers=0), "head.kv.layers"),
    (lambda d: d["kv"].update(seq_len=7), "head.objects[0].shape"),
    (lambda d: d["kv"].update(wire_dtype="f16"), "head.objects[0].dtype"),
    (lambda d: d["kv"].update(torch_dtype="int8"), "head.kv.torch_dtype"),
    (lambda d: d["kv"].pop("seq_len"), "head.kv.seq_len"),
    (lambda d: d["kv"]["model_signature"].update(num_kv_heads=3), "head.objects[0].shape"),
    (lambda d: d["kv"]["model_signature"].update(num_layers=5), "head.kv.layers"),
    (lambda d: d["kv"]["model_signature"].update(version=2), "head.kv.model_signature.version"),
    (lambda d: d["kv"]["model_signature"].pop("head_dim"), "head.kv.model_signature.head_dim"),
    (lambda d: d["objects"][1].update(name="l0.keys"), "head.objects[1].name"),
    (lambda d: d["objects"][2].update(layer=0), "head.objects[2].layer"),
    (lambda d: d.update(msg_type=int(MsgType.THINK)), "head.msg_type"),
    (lambda d: d.update(kv=[1, 2]), "head.kv"),
])
def test_malformed_kv_metadata_is_refused_with_its_field_path(tiny, change, path):
    model, ids, sig = tiny
    cache, _ = prefill(model, ids)
    doc = _head(cache, sig)
    change(doc)
    with pytest.raises(HandshakeError) as info:
        StreamLayout.from_head(resonant.handshake.validate(doc))
    assert info.value.path == path
    # a receiver fails such a stream as bad_head, naming the field
    frame = resonant.encode(resonant.Sync(resonant.stream_layout.compact_json(doc), stream_id=9, frame_seq=0))
    events = Reassembler().receive(frame, 0.0)
    assert [(type(e), e.reason) for e in events] == [(StreamFailed, "bad_head")]
    assert path in events[0].detail


def test_objects_that_are_not_keys_and_values_in_their_layer_shapes_are_refused(tiny):
    model, ids, sig = tiny
    cache, _ = prefill(model, ids)
    doc = _head(cache, sig)
    doc["objects"][1]["shape"] = [1, 2, PROMPT, 8]
    doc["objects"][1]["nbytes"] //= 2
    doc["total_bytes"] -= doc["objects"][1]["nbytes"]
    with pytest.raises(HandshakeError) as info:
        StreamLayout.from_head(resonant.handshake.validate(doc))
    assert info.value.path == "head.objects[1].shape"


def test_sender_side_mistakes_raise_our_errors(tiny):
    model, ids, sig = tiny
    cache, _ = prefill(model, ids)
    objects, kw = _kv_args(cache, dataclasses.replace(sig, num_kv_heads=8))
    with pytest.raises(EncodeError, match="8 KV heads"):
        StreamSender(1, objects, **kw)
    with pytest.raises(UnsupportedDType, match="q5"):
        torch_utils.kv_objects(cache, dtype="q5")
    ints = torch_utils.dynamic_cache([(k.to(torch.int32), v.to(torch.int32)) for k, v in torch_utils.kv_layers(cache)])
    with pytest.raises(UnsupportedDType):
        torch_utils.kv_objects(ints)


def test_peers_that_do_not_know_kv_see_the_plain_stream(tiny):
    """A receiver without KVReceiver (an older resonant) reads the stream as any other: the kv field
    of HEAD is an unknown top-level key there, ignored (handshake.validate passes it through)."""
    model, ids, sig = tiny
    cache, _ = prefill(model, ids)
    objects, kw = _kv_args(cache, sig)
    doc = StreamSender(3, objects, **kw).layout.head_document()
    old = {k: v for k, v in doc.items() if k != "kv"}
    assert StreamLayout.from_head(resonant.handshake.validate(old)).kv is None
    r = Reassembler()
    events = []
    for f in StreamSender(3, objects, **kw):
        events += r.receive(f, 0.0)
    done = events[-1]
    assert isinstance(done, StreamComplete)
    rebuilt = torch_utils.kv_from_arrays(done.objects)
    assert all(torch.equal(a, b) for p, q in zip(torch_utils.kv_layers(cache), torch_utils.kv_layers(rebuilt))
               for a, b in zip(p, q))


def test_signature_from_hf(tiny):
    model, _, sig = tiny
    assert (sig.model_id, sig.num_layers, sig.hidden_size, sig.num_kv_heads, sig.head_dim, sig.dtype) == \
        ("tiny-llama", 4, 64, 2, 16, "f32")
    assert len(sig.tokenizer_hash) == 64
    assert ModelSignature.from_hf(model, _Vocab(256)).tokenizer_hash == sig.tokenizer_hash
    assert ModelSignature.from_hf(model, _Vocab(255)).tokenizer_hash != sig.tokenizer_hash
    assert ModelSignature.from_hf(model).tokenizer_hash == ""
    assert ModelSignature.from_json(sig.to_json()) == sig
    assert KVInfo.from_json(KVInfo(4, 7, "float32", "f32", sig).to_json()).signature == sig


# ------------------------------------------------------------------ the real model


@pytest.fixture(scope="module")
def smollm2():
    if not _smollm2.available():
        pytest.skip("SmolLM2 is not installed: " + _smollm2.INSTALL_HINT)
    tok, model = _smollm2.load()
    return tok, model


@pytest.mark.slow
@pytest.mark.pure_skip
def test_smollm2_continues_identically_after_a_tcp_handoff(smollm2):
    tok, model = smollm2
    sig = ModelSignature.from_hf(model, tok, model_id=_smollm2.GGUF_FILE)
    assert (sig.num_layers, sig.num_kv_heads, sig.head_dim) == (30, 3, 64)
    ids = _smollm2.prompt_ids(tok, 24)
    cache, first = prefill(model, ids)
    want = greedy(model, copy.deepcopy(cache), first, 8)
    events, result = asyncio.run(_handoff("tcp", cache, send_kw={"signature": sig},
                                          server_kw={"expected_signature": sig}, max_frame_bytes=65536))
    assert isinstance(result, int)
    got = events[-1]
    assert isinstance(got, KVCacheReceived) and got.seq_len == ids.shape[1] and got.layers == 30
    assert greedy(model, got.cache, first, 8) == want
