"""The generator: generated files are current, carry the banner, render deterministically,
and every schema error names the YAML file and path."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from codegen.model import SchemaError, load
from codegen.render import ROOT, TARGETS, render_all

SCHEMA = ROOT / "schema"
# texts that list the dtypes or the messages render them from the spec
_WIRES = [d.wire for d in load(SCHEMA).vframe.dtypes]
_MESSAGES = [m.name for m in load(SCHEMA).handshake.messages]


def test_checked_in_files_are_current():
    proc = subprocess.run([sys.executable, "-m", "codegen", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout


def test_check_fails_with_the_fix_command(tmp_path):
    out = tmp_path / "tree"
    subprocess.run([sys.executable, "-m", "codegen", "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    target = out / "specs" / "vframe_binary_layout.md"
    target.write_text(target.read_text() + "hand edit\n")
    proc = subprocess.run([sys.executable, "-m", "codegen", "--check", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "specs/vframe_binary_layout.md" in proc.stderr
    assert "fix with: make codegen" in proc.stderr


def test_render_is_deterministic_and_bannered():
    model = load(SCHEMA)
    first, second = render_all(model), render_all(load(SCHEMA))
    assert first == second
    assert set(first) == set(TARGETS.values())
    for target, text in first.items():
        assert "do not edit" in text.splitlines()[0], target


def _mutated(tmp_path: Path, file: str, edit) -> Path:
    d = tmp_path / "schema"
    shutil.copytree(SCHEMA, d)
    data = yaml.safe_load((d / file).read_text())
    edit(data)
    (d / file).write_text(yaml.safe_dump(data, sort_keys=False))
    return d


def _dtype(data, name):
    return next(v for v in data["enums"]["dtype"]["values"] if v["name"] == name)


@pytest.mark.parametrize(
    "file, edit, message",
    [
        ("vframe.yaml", lambda d: _dtype(d, "Q4")["size"].update(rule="nibbles"),
         "vframe.yaml: enums.dtype.values[2].size.rule: unknown size rule 'nibbles' (expected one of element, packed, block, opaque)"),
        ("vframe.yaml", lambda d: _dtype(d, "I8").pop("doc"),
         "vframe.yaml: enums.dtype.values[1]: missing required key 'doc' (every entry carries a one-line doc)"),
        ("vframe.yaml", lambda d: _dtype(d, "I8").update(value=1),
         "vframe.yaml: enums.dtype.values[1].value: duplicate value 1"),
        ("vframe.yaml", lambda d: d["enums"]["msg_type"]["values"][0]["layouts"].append(["hidden", "thought"]),
         "vframe.yaml: enums.msg_type.values[0].layouts[1][1]: unknown role 'thought'"),
        ("vframe.yaml", lambda d: d["header"][3].update(type="u24"),
         "vframe.yaml: header[3].type: unknown type 'u24' (expected u8, u16, u32, u64 or bytes)"),
        ("vframe.yaml", lambda d: d["header"][5].update(limit="max_everything"),
         "vframe.yaml: header[5].limit: unknown limit 'max_everything' (defined: max_dense_bytes, max_dims, max_frame_bytes, max_segments, max_shape_elements, max_slices)"),
        ("vframe.yaml", lambda d: d["enums"]["flags"]["values"][1].update(value=3),
         "vframe.yaml: enums.flags.values[1].value: 3 is not a single bit"),
        ("vframe.yaml", lambda d: d["enums"]["msg_type"]["values"][4]["layouts"].append(["divergence", "mask"]),
         "vframe.yaml: enums.msg_type.values[4].layouts[3]: two layouts with 2 slices: slice roles would be ambiguous"),
        ("vframe.yaml", lambda d: d["slice"][1].update(name="rank"),
         "vframe.yaml: slice[2].count: count 'shape_len' names neither an earlier field nor a count rule"),
        ("vframe.yaml", lambda d: d["limits"][0].update(colour="red"),
         "vframe.yaml: limits[0].colour: unknown key (allowed: doc, name, value)"),
        ("vframe.yaml", lambda d: d["transports"][0].pop("max_frame_bytes"),
         "vframe.yaml: transports[0]: missing required key 'max_frame_bytes'"),
        ("vframe.yaml", lambda d: d["transports"][0].update(max_frame_bytes=70000),
         "vframe.yaml: transports[0].max_frame_bytes: 70000 is out of range [33, 65536]"),
        ("vframe.yaml", lambda d: d["transports"][1]["length_prefix"].update(type="u16"),
         "vframe.yaml: transports[1].length_prefix.type: a u16 cannot hold max_frame_bytes (65536)"),
        ("vframe.yaml", lambda d: d["transports"][1].pop("length_prefix"),
         "vframe.yaml: transports[1]: missing required key 'length_prefix' (framing is length_prefix)"),
        ("vframe.yaml", lambda d: d["transports"][0].update(framing="carrier_pigeon"),
         "vframe.yaml: transports[0].framing: unknown framing 'carrier_pigeon' (expected one of datagram, length_prefix)"),
        ("vframe.yaml", lambda d: d["transports"][1]["errors"][0].update(action="retry"),
         "vframe.yaml: transports[1].errors[0].action: unknown action 'retry' (expected one of continue, close, report)"),
        ("vframe.yaml", lambda d: d["transports"][1]["errors"][0].update(error="OopsError"),
         "vframe.yaml: transports[1].errors[0].error: unknown error 'OopsError' (not in errors)"),
        ("vframe.yaml", lambda d: d.pop("transports"),
         "vframe.yaml: missing required key 'transports'"),
        ("handshake.yaml", lambda d: d["messages"][1]["fields"][1].update(type="float128"),
         "handshake.yaml: messages[1].fields[1].type: unknown type 'float128' (expected one of string, number, bool, u32, u64, hex32, hex64, object, list[string], list[u32], list[object], ranges)"),
        ("handshake.yaml", lambda d: d["messages"][0]["fields"][0].update(const="pong"),
         "handshake.yaml: messages[0].fields: the first field must be 'method' with const equal to the message name"),
        ("handshake.yaml", lambda d: d["state_machine"]["transitions"][0]["row"].update(start="explode idle"),
         "handshake.yaml: state_machine.transitions[0].row.start: 'explode' is not one of the actions"),
        ("handshake.yaml", lambda d: d["state_machine"]["transitions"][0]["row"].update(start="send_ping limbo"),
         "handshake.yaml: state_machine.transitions[0].row.start: 'limbo' is not one of the states"),
        ("handshake.yaml", lambda d: d["state_machine"]["transitions"][0]["row"].pop("close"),
         "handshake.yaml: state_machine.transitions[0].row: missing required key 'close'"),
        ("handshake.yaml", lambda d: d["state_machine"]["transitions"].pop(1),
         "handshake.yaml: state_machine.transitions: client can reach 'await_capability' (idle + start) but has no row "
         "for it"),
    ],
    ids=["size-rule", "doc", "dup-value", "role", "type", "limit", "flag-bit", "ambiguous-layout", "count", "key",
         "transport-max", "transport-max-range", "transport-prefix-type", "transport-prefix", "transport-framing",
         "transport-action", "transport-error", "transports", "hs-type", "hs-method", "sm-action", "sm-state",
         "sm-missing-input", "sm-missing-row"],
)
def test_schema_errors_name_the_yaml_path(tmp_path, file, edit, message):
    with pytest.raises(SchemaError) as exc:
        load(_mutated(tmp_path, file, edit))
    assert str(exc.value) == message


def _msg(data, name):
    return next(m for m in data["messages"] if m["name"] == name)


def _lim(data, name):
    return next(lim for lim in data["limits"] if lim["name"] == name)


def _field(fields, name):
    return next(f for f in fields if f["name"] == name)


@pytest.mark.parametrize(
    "file, edit, message",
    [
        # every limit is enforced somewhere, or the model says it is not
        ("vframe.yaml", lambda d: d["limits"].append({"name": "max_foo", "value": 3, "doc": "Foo."}),
         "vframe.yaml: limits[6].name: nothing enforces limit 'max_foo': name it in a field's 'limit:' that the decoder "
         "checks, or enforce it in the runtime and list it in codegen.model.RUNTIME_LIMITS (enforced there: "
         "max_frame_bytes, max_shape_elements, max_dense_bytes)"),
        ("vframe.yaml", lambda d: _field(d["header"], "stream_id").update(limit="max_slices"),
         "vframe.yaml: header[3].limit: no generated check enforces a limit on header.stream_id (limits are checked at "
         "header.num_slices (max_slices), slice.shape_len (max_dims), transforms.compression.segments.segment_count "
         "(max_segments))"),
        ("vframe.yaml", lambda d: _field(d["header"], "num_slices").pop("limit"),
         "vframe.yaml: header[5].limit: header.num_slices must carry 'limit: max_slices' (the decoder checks it there)"),
        ("handshake.yaml", lambda d: d["limits"].append({"name": "max_foo", "value": 3, "doc": "Foo."}),
         "handshake.yaml: limits[23].name: nothing enforces limit 'max_foo': name it in a field's 'limit:' "
         "that the decoder checks, or enforce it in the runtime and list it in codegen.model.RUNTIME_LIMITS "
         "(enforced there: max_json_bytes, max_objects, max_list_items, max_report_ranges, report_burst, "
         "max_resend_ranges, max_kv_layers, report_interval_ms, feedback_timeout_ms, feedback_probes, max_retransmits, max_string_chars, "
         "min_chunk_bytes, max_fec_k, max_fec_m, max_fec_pieces, session_random_bytes, replay_evicted_ranges, "
         "control_tags_remembered, sent_tags_remembered, reference_fallback_ms, zstd_probe_chunks, "
         "zstd_min_saving_permille)"),
        # cross-field consistency
        ("vframe.yaml", lambda d: _lim(d, "max_slices").update(value=2),
         "vframe.yaml: limits[1].value: max_slices (2) is less than the longest layout (3 slices, Critique)"),
        ("vframe.yaml", lambda d: _lim(d, "max_dims").update(value=300),
         "vframe.yaml: limits[2].value: max_dims (300) does not fit slice.shape_len (u8)"),
        ("handshake.yaml", lambda d: _lim(d, "max_list_items").update(value=4),
         f"handshake.yaml: limits[3].value: max_list_items (4) is less than the {len(_WIRES)} choices of "
         "ping.supports.dtype"),
        ("handshake.yaml", lambda d: _lim(d, "max_json_bytes").update(value=65500),
         "handshake.yaml: limits[0].value: max_json_bytes (65500) plus a one-slice frame's 43 bytes is more than "
         "max_frame_bytes (65536): a control document must fit one frame"),
        ("handshake.yaml", lambda d: _msg(d, "capability")["example"]["supports"].update(dtype=["f16", "f64"]),
         "handshake.yaml: messages[1].example: the example breaks the message's fields: supports.dtype[1]: 'f64' is not "
         f"one of {', '.join(_WIRES)}"),
        # new or unknown fields: a SchemaError at their path, never a KeyError
        ("vframe.yaml", lambda d: d["header"].insert(9, {"name": "priority", "type": "u8", "doc": "Priority."}),
         "vframe.yaml: header[9].name: 'priority' is not a header field the codec lays out (known: version, msg_type, "
         "flags, stream_id, frame_seq, num_slices, slice_len, space_hash32, modality); a new header field needs the "
         "codec's Frame, encoder and decoder extended first"),
        ("vframe.yaml", lambda d: _dtype(d, "F32").update(colour="red"),
         "vframe.yaml: enums.dtype.values[4].colour: unknown key (allowed: doc, fallback, name, numpy, offered, "
         "reference, size, value, wire)"),
        ("vframe.yaml", lambda d: d["enums"]["msg_type"]["values"].pop(),
         "vframe.yaml: enums.msg_type.values: missing value 'CHUNK' (the hand-written runtime uses it by name)"),
        ("handshake.yaml", lambda d: _field(_msg(d, "ping")["fields"], "max_frame_bytes").update(defualt=2),
         "handshake.yaml: messages[0].fields[6].defualt: unknown key (allowed: choices, choices_from, const, default, "
         "doc, fields, name, required, type)"),
        ("handshake.yaml", lambda d: d["messages"].pop(),
         "handshake.yaml: messages: missing message 'confirm' (the Session or the V-Stream uses it)"),
        ("handshake.yaml", lambda d: d["flow"][0].update(message="hello"),
         f"handshake.yaml: flow[0].message: 'hello' is neither a message nor data (messages: {', '.join(_MESSAGES)})"),
        # the dtypes' negotiation facts
        ("vframe.yaml", lambda d: _dtype(d, "F16").pop("wire"),
         "vframe.yaml: enums.dtype.values[0]: missing required key 'wire'"),
        ("vframe.yaml", lambda d: _dtype(d, "F32").update(wire="f16"),
         "vframe.yaml: enums.dtype.values[4].wire: duplicate wire name 'f16'"),
        ("vframe.yaml", lambda d: _dtype(d, "F32").update(fallback=["f64"]),
         f"vframe.yaml: enums.dtype.values[4].fallback[0]: unknown dtype wire name 'f64' (known: {', '.join(_WIRES)})"),
        ("vframe.yaml", lambda d: _dtype(d, "F32").update(fallback=["q4"]),
         "vframe.yaml: enums.dtype.values[4].fallback[0]: 'q4' has no numpy type: a tensor cannot be converted to it"),
        ("vframe.yaml", lambda d: _dtype(d, "Q4").update(fallback=["f16"]),
         "vframe.yaml: enums.dtype.values[2].fallback: Q4 has no numpy type and is not block-quantized: it cannot be "
         "converted"),
        ("vframe.yaml", lambda d: [v.update(offered=False) for v in d["enums"]["dtype"]["values"]],
         "vframe.yaml: enums.dtype.values: no dtype is offered (every one has offered: false): a session could agree "
         "to nothing"),
        # handshake defaults and choices
        ("handshake.yaml", lambda d: _msg(d, "ping")["fields"][0].update(default="ping"),
         "handshake.yaml: messages[0].fields[0].default: a required field has no default"),
        ("handshake.yaml", lambda d: _field(_msg(d, "ping")["fields"], "v").update(default=-1),
         "handshake.yaml: messages[0].fields[2].default: default -1 does not fit the field: expected an integer in "
         "[0, 4294967295]"),
        ("handshake.yaml", lambda d: _field(_msg(d, "ping")["fields"], "max_frame_bytes").update(default="max_everything"),
         "handshake.yaml: messages[0].fields[6].default: unknown limit 'max_everything' (defined: "
         "control_tags_remembered, feedback_probes, feedback_timeout_ms, max_dense_bytes, max_dims, max_fec_k, max_fec_m, "
         "max_fec_pieces, max_frame_bytes, max_json_bytes, max_kv_layers, max_list_items, max_objects, max_report_ranges, "
         "max_resend_ranges, max_retransmits, max_segments, max_shape_elements, max_slices, max_string_chars, "
         "min_chunk_bytes, reference_fallback_ms, replay_evicted_ranges, report_burst, report_interval_ms, "
         "sent_tags_remembered, session_random_bytes, zstd_min_saving_permille, zstd_probe_chunks)"),
        ("handshake.yaml", lambda d: _field(_msg(d, "ping")["fields"], "supports")["fields"][1].update(choices_from="modality"),
         "handshake.yaml: messages[0].fields[8].fields[1].choices_from: unknown source 'modality' (expected one of dtype)"),
    ],
    ids=["limit-unenforced", "limit-field-unchecked", "limit-field-missing", "hs-limit-unenforced",
         "max-slices-layout", "max-dims-type", "list-items-choices", "json-fits-frame", "example",
         "new-header-field", "dtype-key", "runtime-enum-value", "hs-key", "runtime-message", "flow-message",
         "wire-missing", "wire-dup", "fallback-unknown", "fallback-target", "fallback-source", "nothing-offered",
         "default-required", "default-type", "default-limit", "choices-from"],
)
def test_schema_loop_errors_name_the_yaml_path(tmp_path, file, edit, message):
    with pytest.raises(SchemaError) as exc:
        load(_mutated(tmp_path, file, edit))
    assert str(exc.value) == message


def test_runtime_tables_match_the_runtime():
    """RUNTIME_LIMITS and RUNTIME_ENUM_VALUES describe the hand-written code: every limit listed there
    is used by it, and every enum value it names (DType.F16, MsgType.SYNC, ...) is listed."""
    import re

    from codegen.model import RUNTIME_ENUM_VALUES, RUNTIME_LIMITS

    runtime = ROOT / "resonant"
    sources = [p.read_text(encoding="utf-8") for p in sorted(runtime.rglob("*"))
               if p.suffix in (".py", ".pyx", ".pxi", ".pxd") and p.name not in ("_spec.py", "errors.py")]
    # uses, not the definitions (NAME = value) of the constants
    text = re.sub(r"(?m)^[A-Z_0-9]+ *(: *[^=]+)?= *[-0-9\"'(\[{].*$", "", "\n".join(sources))
    for file, limits in RUNTIME_LIMITS.items():
        for name in limits:
            assert re.search(rf"\b(HANDSHAKE_)?{name.upper()}\b", text), f"{file}: {name} is not used by the runtime"
    enum_classes = {"MsgType": "msg_type", "DType": "dtype", "Modality": "modality", "Flags": "flags",
                    "Filters": "filters"}
    templates = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "codegen" / "templates").glob("*.j2"))
    generated = {(ROOT / t).resolve() for t in TARGETS.values()}
    hand_written = "\n".join(p.read_text(encoding="utf-8") for p in sorted(runtime.rglob("*"))
                             if p.suffix in (".py", ".pyx", ".pxi", ".pxd") and p.resolve() not in generated)
    for cls, value in re.findall(r"\b(MsgType|DType|Modality|Flags|Filters)\.([A-Z][A-Z0-9_]*)\b",
                                 hand_written + templates):
        assert value in RUNTIME_ENUM_VALUES[enum_classes[cls]], f"{cls}.{value} is used but not in RUNTIME_ENUM_VALUES"


def test_every_message_class_is_exported():
    import resonant
    from resonant import _spec

    for name in _spec.MESSAGE_CLASSES.values():
        assert getattr(resonant, name) is getattr(resonant._codec, name)
        assert name in resonant.__all__


def test_dtype_tables_come_from_the_yaml():
    from resonant import _spec, handshake

    model = load(SCHEMA)
    assert {int(k): v for k, v in _spec.DTYPE_WIRE_NAMES.items()} == {d.value: d.wire for d in model.vframe.dtypes}
    assert _spec.REFERENCE_DTYPES == tuple(d.wire for d in model.vframe.dtypes if d.reference)
    assert _spec.DEFAULT_DTYPES == tuple(d.wire for d in model.vframe.dtypes if d.offered)
    assert handshake.SCHEMA["ping"]["supports"]["fields"]["dtype"]["choices"] == list(_spec.DTYPE_WIRE_NAMES.values())
    assert handshake.SCHEMA["capability"]["supports"]["fields"]["dtype"]["choices"] == list(_spec.DTYPE_WIRE_NAMES.values())


def test_cli_reports_schema_errors(tmp_path):
    d = _mutated(tmp_path, "vframe.yaml", lambda d: _dtype(d, "F16").update(value=300))
    proc = subprocess.run([sys.executable, "-m", "codegen", "--schema", str(d), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "vframe.yaml: enums.dtype.values[0].value: 300 is out of range [0, 255]" in proc.stderr


def test_invalid_yaml_is_reported(tmp_path):
    d = tmp_path / "schema"
    shutil.copytree(SCHEMA, d)
    (d / "vframe.yaml").write_text("meta: [unclosed\n")
    with pytest.raises(SchemaError, match=r"^vframe\.yaml: not valid YAML"):
        load(d)


def test_worked_example_is_the_reference_ping():
    from conftest import vector_bytes

    from codegen.render import worked_example
    assert worked_example(load(SCHEMA))["bytes"] == vector_bytes("01_sync_ping.bin")
    spec = (ROOT / "specs" / "vframe_binary_layout.md").read_text()
    assert vector_bytes("01_sync_ping.bin")[:16].hex(" ") in spec


# --------------------------------------------------------------------------- transports


def test_transport_constants_equal_the_yaml():
    import resonant._spec as spec

    raw = yaml.safe_load((SCHEMA / "vframe.yaml").read_text())["transports"]
    assert [t["name"] for t in raw] == ["udp", "tcp"]
    for t in raw:
        assert getattr(spec, f"MAX_{t['name'].upper()}_FRAME_BYTES") == t["max_frame_bytes"]
    assert spec.MAX_UDP_FRAME_BYTES == 65507 == 65535 - 20 - 8  # the IPv4 UDP payload limit
    assert spec.MAX_TCP_FRAME_BYTES == spec.MAX_FRAME_BYTES == 65536
    assert spec.UDP_SMALL_PATH_FRAME_BYTES == raw[0]["small_path_frame_bytes"] == 1200
    tcp = raw[1]["length_prefix"]
    assert (tcp["type"], tcp["endian"]) == ("u32", "little")
    assert spec.TCP_LENGTH_PREFIX_BYTES == 4 == struct.calcsize(spec.TCP_LENGTH_PREFIX_FORMAT)
    assert spec.TCP_LENGTH_PREFIX_FORMAT == "<I"
    assert spec.TCP_LENGTH_PREFIX_MIN == tcp["min"] == 1
    model = load(SCHEMA).vframe
    assert model.transport("udp").max_frame_bytes == 65507 and model.transport("udp").overhead == 0
    assert model.transport("tcp").length_prefix.width == 4 and model.transport("tcp").overhead == 4
    assert [c.action for c in model.transport("tcp").errors] == ["close", "continue", "report"]


def test_spec_renders_the_transports():
    spec = (ROOT / "specs" / "vframe_binary_layout.md").read_text()
    section = spec[spec.index("\n## Transports\n"):]
    for needle in ("### `udp`", "### `tcp`", "`MAX_UDP_FRAME_BYTES`", "`TCP_LENGTH_PREFIX_BYTES`",
                   "| `udp` | one frame per datagram | 0 | 65507 |", "the length is 1 to 65536",
                   "reports it and closes the connection, allocating nothing", "`FramingError`",
                   "e.g. a 4 GiB prefix", "split over many reads", "truncated record", "e.g. 1200 bytes",
                   "### Two `tcp` records in one write"):
        assert needle in section, needle
    assert "at most 65507 over `udp`" in spec  # the Size line of the overview


def test_two_records_example_is_two_real_frames():
    import resonant
    from conftest import vector_bytes

    from codegen.render import transport_example, worked_example

    model = load(SCHEMA)
    records = transport_example(model, worked_example(model))
    data = records["bytes"]
    frames, pos = [], 0
    while pos < len(data):  # read the write back as a receiver would
        (length,) = struct.unpack_from("<I", data, pos)
        assert 1 <= length <= 65536
        frames.append(data[pos + 4:pos + 4 + length])
        pos += 4 + length
    assert pos == len(data)
    assert frames == [vector_bytes("01_sync_ping.bin"), vector_bytes("09_heart_no_slices.bin")]
    assert [type(resonant.decode(f)).__name__ for f in frames] == ["Sync", "Sync"]
    spec = (ROOT / "specs" / "vframe_binary_layout.md").read_text()
    dump = "\n".join(f"{i:08x}  {data[i:i + 16].hex(' ')}" for i in range(0, len(data), 16))
    assert dump in spec


def _dict_paths(value, path=""):
    """The YAML path of every mapping in a loaded YAML document."""
    if isinstance(value, dict):
        yield path, value
        for k, v in value.items():
            yield from _dict_paths(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _dict_paths(v, f"{path}[{i}]")


@pytest.mark.parametrize("file", ["vframe.yaml", "handshake.yaml"])
def test_an_unknown_key_anywhere_is_a_schema_error_at_its_path(file, monkeypatch):
    """Add a key the generator does not know to every mapping of the YAML in turn: the model refuses
    each with a SchemaError naming the key's path (or the path of the mapping it sits in, e.g. an
    example document), never a KeyError or another exception."""
    import copy

    import codegen.model as m

    texts = {name: yaml.safe_load((SCHEMA / name).read_text()) for name in ("vframe.yaml", "handshake.yaml")}
    paths = [p for p, _ in _dict_paths(texts[file])]
    assert len(paths) > 50
    for target in paths:
        data = copy.deepcopy(texts)
        node = next(d for p, d in _dict_paths(data[file]) if p == target)
        node["zzz_unknown"] = 1
        monkeypatch.setattr(m, "_read", lambda path, data=data: m._Node(data[path.name], "", path.name))
        with pytest.raises(SchemaError) as exc:
            load(SCHEMA)
        text = str(exc.value)
        assert text.startswith(f"{file}: "), (target, text)
        where = text[len(file) + 2:].split(": ")[0]
        key = f"{target}.zzz_unknown" if target else "zzz_unknown"
        assert key.startswith(where) or where == "missing required key 'zzz_unknown'", (target, text)


@pytest.mark.parametrize("section", ["header", "slice", "envelope", "trailer"])
def test_a_new_frame_field_is_a_schema_error_not_a_crash(tmp_path, section):
    d = _mutated(tmp_path, "vframe.yaml",
                 lambda d: d[section].append({"name": "priority", "type": "u8", "doc": "A new field."}))
    with pytest.raises(SchemaError, match=rf"^vframe\.yaml: {section}"):
        render_all(load(d))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: _dtype(d, "F32").update(numpy="<f2"),
         "vframe.yaml: enums.dtype.values[4].numpy: numpy type '<f2' has 2-byte elements, but the size rule says 4"),
        (lambda d: _dtype(d, "F32").update(size={"rule": "element", "bytes": 8}),
         "vframe.yaml: enums.dtype.values[4].numpy: numpy type '<f4' has 4-byte elements, but the size rule says 8"),
        (lambda d: _dtype(d, "F32").update(numpy="float33"),
         "vframe.yaml: enums.dtype.values[4].numpy: 'float33' is not a numpy dtype"),
        (lambda d: _dtype(d, "Q4").update(numpy="i1"),
         "vframe.yaml: enums.dtype.values[2].numpy: a numpy view needs the element size rule, Q4 has 'packed'"),
    ],
    ids=["itemsize", "size-bytes", "unknown", "rule"],
)
def test_a_dtype_numpy_type_must_match_its_size_rule(tmp_path, edit, message):
    """Slice.numpy() views slice_len bytes as prod(shape) elements of the numpy type: a numpy type
    whose element size is not the size rule's would read past the payload, so the model refuses it."""
    with pytest.raises(SchemaError) as exc:
        load(_mutated(tmp_path, "vframe.yaml", edit))
    assert str(exc.value) == message


@pytest.mark.parametrize("name, size", [
    ("Q8_0", {"rule": "block", "block_elements": 32, "block_bytes": 36}),
    ("Q4_0", {"rule": "block", "block_elements": 64, "block_bytes": 34}),
    ("I8", {"rule": "element", "bytes": 2}),  # (with numpy <i2, so that only the rule is at fault)
])
def test_a_size_rule_the_runtime_implements_cannot_change(tmp_path, name, size):
    """resonant/_quant.pxi's kernels write and read ggml's Q8_0/Q4_0 blocks (32 values in 34/18
    bytes): a YAML that changes them would have the decoder and the kernels disagree."""
    values = yaml.safe_load((SCHEMA / "vframe.yaml").read_text())["enums"]["dtype"]["values"]
    index = [v["name"] for v in values].index(name)
    with pytest.raises(SchemaError) as exc:
        load(_mutated(tmp_path, "vframe.yaml",
                      lambda d: _dtype(d, name).update(size=size, **({"numpy": "<i2"} if name == "I8" else {}))))
    assert str(exc.value).startswith(f"vframe.yaml: enums.dtype.values[{index}].size: {name} must keep {{")
