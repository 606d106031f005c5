"""Handshake JSON documents are validated against the schema generated from the YAML."""

from __future__ import annotations

import json

import pytest
from conftest import vector_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

import resonant
from resonant import handshake
from resonant.errors import DecodeError, HandshakeError


@pytest.mark.parametrize("method", sorted(handshake.EXAMPLES))
def test_examples_are_valid(method):
    doc = handshake.EXAMPLES[method]
    assert handshake.parse(json.dumps(doc).encode()) == doc


def test_reference_ping_frame_carries_a_valid_ping():
    frame = resonant.decode(vector_bytes("01_sync_ping.bin"))
    assert handshake.parse(frame.json.payload) == {"method": "ping", "ts": 1730616000}


@pytest.mark.parametrize(
    "doc, message",
    [
        ([], "$: expected a JSON object, got list"),
        ({"method": "hello"}, f"$.method: 'hello' is not one of {', '.join(handshake.SCHEMA)}"),
        ({"method": "capability", "v": 1}, "capability.agreed_proto: required field is missing"),
        ({"method": "capability", "v": -1, "agreed_proto": 1}, "capability.v: expected an integer in [0, 4294967295], got -1"),
        ({"method": "head", "v": 1, "msg_type": 1, "chunk_bytes": 8, "total_bytes": 2**64, "objects": [], "hash": "xxh3_64"},
         "head.total_bytes: expected an integer in [0, 18446744073709551615], got 18446744073709551616"),
        ({"method": "head", "v": 1, "msg_type": 1, "chunk_bytes": 8, "total_bytes": 1, "hash": "xxh3_64",
          "objects": [{"dtype": 1, "shape": [1, -2], "nbytes": 4}]},
         "head.objects[0].shape[1]: expected an integer in [0, 4294967295], got -2"),
        ({"method": "head", "v": 1, "msg_type": 1, "chunk_bytes": 8, "total_bytes": 1, "hash": "xxh3_64",
          "objects": [{"dtype": 1, "shape": [1]}]}, "head.objects[0].nbytes: required field is missing"),
        ({"method": "capability", "v": 1, "agreed_proto": 1, "supports": {"dtype": ["f16", 3]}},
         "capability.supports.dtype[1]: expected a string, got int"),
        ({"method": "capability", "v": 1, "agreed_proto": 1, "supports": {"colour": 1}},
         "capability.supports.colour: unknown key (extensions start with 'x-')"),
        ({"method": "error", "code": "NOPE", "message": "x"},
         f"error.code: 'NOPE' is not one of {', '.join(handshake.SCHEMA['error']['code']['choices'])}"),
        ({"method": "ping", "ts": "now"}, "ping.ts: expected a number, got str"),
        ({"method": "capability", "v": 1, "agreed_proto": 1, "compress": ["zstd"] * 65},
         "capability.compress: 65 items, more than max_list_items (64)"),
    ],
)
def test_invalid_documents_name_the_path(doc, message):
    with pytest.raises(HandshakeError) as exc:
        handshake.validate(doc)
    assert str(exc.value) == message


def _head_of(objects) -> dict:
    return {"method": "head", "v": 1, "msg_type": 1, "chunk_bytes": 8, "total_bytes": 1, "hash": "xxh3_64",
            "objects": [{"dtype": 1, "shape": [2, 3], "nbytes": 12}] * 5 + objects}


@pytest.mark.parametrize("obj, message", [
    ({"dtype": 1, "shape": [1], "nbytes": 2, "colour": 3}, "head.objects[5].colour: unknown key (extensions start with 'x-')"),
    ({"dtype": 1, "nbytes": 2, "colour": 3}, "head.objects[5].shape: required field is missing"),
    ({"dtype": True, "shape": [1], "nbytes": 2}, "head.objects[5].dtype: expected an integer in [0, 4294967295], got True"),
    ({"dtype": 1, "shape": [1, False], "nbytes": 2}, "head.objects[5].shape[1]: expected an integer in [0, 4294967295], got False"),
    ({"dtype": 1, "shape": [1, 2**32], "nbytes": 2}, "head.objects[5].shape[1]: expected an integer in [0, 4294967295], got 4294967296"),
    ({"dtype": 1, "shape": [1.0], "nbytes": 2}, "head.objects[5].shape[0]: expected an integer in [0, 4294967295], got 1.0"),
    ({"dtype": 1, "shape": (1,), "nbytes": 2}, "head.objects[5].shape: expected a list, got tuple"),
    ({"dtype": 1, "shape": [1] * 65, "nbytes": 2}, "head.objects[5].shape: 65 items, more than max_list_items (64)"),
    ({"dtype": 1, "shape": [1], "nbytes": -1}, "head.objects[5].nbytes: expected an integer in [0, 18446744073709551615], got -1"),
    ({"dtype": 1, "shape": [1], "nbytes": 2, "name": 7}, "head.objects[5].name: expected a string, got int"),
    ([1], "head.objects[5]: expected an object, got list"),
])
def test_head_objects_are_checked_field_by_field(obj, message):
    """The checks of a HEAD's objects (fast paths for integers, shapes and object items: the
    path of an item is built only when it fails) reject what the general check rejects, with
    the same path."""
    with pytest.raises(HandshakeError) as exc:
        handshake.validate(_head_of([obj]))
    assert str(exc.value) == message
    ok = _head_of([{"name": "k", "layer": 0, "x-note": 1, "dtype": 1, "shape": [], "nbytes": 2}])
    assert handshake.validate(ok) is ok


def test_extensions_and_unknown_top_level_keys_pass():
    doc = {"method": "capability", "v": 1, "agreed_proto": 1, "supports": {"x-custom": True}, "future": 1}
    assert handshake.validate(doc) is doc


def test_oversized_and_malformed_json():
    with pytest.raises(HandshakeError, match=r"more than max_json_bytes \(60000\)"):
        handshake.parse(b" " * 60001)
    with pytest.raises(HandshakeError, match="not valid UTF-8 JSON"):
        handshake.parse(b"{\"method\": ")
    with pytest.raises(HandshakeError, match="not valid UTF-8 JSON"):
        handshake.parse(b"\xff\xfe")
    with pytest.raises(HandshakeError, match="not valid UTF-8 JSON"):
        handshake.parse(b"[" * 5000 + b"]" * 5000)
    assert issubclass(HandshakeError, DecodeError)


def test_model_signature_travels_in_the_handshake():
    from resonant import ModelSignature
    sig = ModelSignature("sentence-transformers/all-MiniLM-L6-v2", "main", "f16", 6, 384, 12, 32, "ab12")
    doc = {"method": "capability", "v": 2, "agreed_proto": 2, "space_hash32": sig.space_hash32(),
           "model_signature": sig.to_json()}
    assert handshake.parse(json.dumps(doc)) == doc
    assert ModelSignature.from_json(doc["model_signature"]) == sig
    ping = {"method": "ping", "ts": 1, "model_signature": {**sig.to_json(), "num_layers": "six"}}
    with pytest.raises(HandshakeError, match=r"^ping.model_signature.num_layers: expected an integer"):
        handshake.validate(ping)
    missing = {k: v for k, v in sig.to_json().items() if k != "head_dim"}
    with pytest.raises(HandshakeError, match=r"^ping.model_signature.head_dim: required field is missing$"):
        handshake.validate({"method": "ping", "model_signature": missing})


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_JSON_VALUES)
def test_loads_reads_what_json_loads_reads(value):
    """handshake.loads (orjson, then json for what orjson refuses) gives json.loads's results, on
    documents json.dumps writes: NaN and infinities, integers of any size, any text."""
    raw = json.dumps(value).encode()
    assert repr(handshake.loads(raw)) == repr(json.loads(raw))


@pytest.mark.parametrize("raw", [b'{"a": NaN}', b"[18446744073709551616, -9223372036854775809]", b'"\\ud800"',
                                 b'{"a": 1, "a": 2}', b"1e400"])
def test_loads_takes_what_orjson_refuses_as_json_does(raw):
    assert repr(handshake.loads(raw)) == repr(json.loads(raw))


@pytest.mark.parametrize("raw, error", [(b'{"method": ', ValueError), (b"\xff\xfe", UnicodeDecodeError),
                                        (b"[" * 5000 + b"]" * 5000, RecursionError), (b"\xef\xbb\xbf{}", ValueError)])
def test_loads_raises_what_json_loads_raises(raw, error):
    with pytest.raises(error):
        handshake.loads(raw)


def test_dumps_is_compact_json_and_takes_big_integers():
    doc = {"method": "head", "name": "kv \u00e9\u4e2d", "n": [1, 2**40], "big": 2**70}
    out = handshake.dumps(doc)
    assert b" " not in out.replace("kv ".encode(), b"") and json.loads(out) == doc
    assert handshake.dumps({"a": [1, "b"]}) == b'{"a":[1,"b"]}'


@pytest.mark.parametrize("depth", [1005, 1020])
@pytest.mark.parametrize("parse", [handshake.parse, handshake.parse_if_json])
def test_a_document_nested_as_deep_as_orjson_reads_is_a_handshake_error(parse, depth):
    """orjson reads nesting up to 1024 deep, past where json.loads raised RecursionError (~1000):
    checking such a document (an error's repr of the value) must still end in a HandshakeError,
    never a RecursionError."""
    raw = b'{"method": "head", "v": ' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(HandshakeError, match=r"^\$"):
        parse(raw)
