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
         "handshake.yaml: messages[1].fields[1].type: unknown type 'float128' (expected one of string, number, bool, u32, u64, hex32, hex64, object, list[string], list[u32], list[object])"),
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
