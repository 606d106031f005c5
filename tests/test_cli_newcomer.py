"""A newcomer's first hour (issue 16 part 4): what the README's first commands do on a fresh
clone, and the `resonant` command's texts, files and output formats.

Child processes and receivers come from test_transport's helpers (every wait bounded, every
child killed in a `finally`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
from test_transport import HOST, receiver, run_cli

import resonant
from resonant import Key, MsgType
from resonant._spec import DTYPE_WIRE_NAMES
from resonant.session import FrameRejected, HandshakeFailed, Session, SessionConfig

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("newcomer")
    rng = np.random.default_rng(16)
    np.save(d / "small.npy", rng.standard_normal((1, 64)).astype(np.float16))
    np.save(d / "mid.npy", rng.standard_normal((2, 16375)).astype(np.float16))  # 65,500 bytes: a stream
    np.save(d / "big.npy", rng.standard_normal((2, 2, 1 << 20)).astype(np.float16))  # 8 MiB: progress bar
    (d / "notes.txt").write_text("not an array\n")
    Key.generate().to_file(d / "a.key")
    Key.generate().to_file(d / "b.key")
    return d


def _json_lines(rx) -> list[dict]:
    """recv --json's lines: the messages and streams, then the rejected events (test_transport's
    _Child keeps those apart, in .rejected)."""
    return [json.loads(x) for x in rx.stdout + rx.rejected]


# ------------------------------------------------------------------ fresh clone: make codegen, import


def test_make_codegen_installs_what_codegen_needs_in_a_bare_venv(tmp_path):
    """In a venv with nothing but Python, `make codegen` first installs PyYAML and Jinja2 (the
    `codegen` extra); here pip may not reach an index, so it fails, but saying what it tried."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    bare = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # (conftest's may name a site-packages)
    assert subprocess.run([py, "-c", "import yaml"], capture_output=True, env=bare).returncode != 0
    r = subprocess.run(["make", "-s", "codegen", f"PYTHON={py}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**bare, "PIP_NO_INDEX": "1"})
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "No module named 'yaml'" not in out, out
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["codegen"]
    assert f"{py} -m pip install" in out and all(req in out for req in extra), out


def test_the_makefile_codegen_requirements_are_the_codegen_extra():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["codegen"]
    m = re.search(r"^CODEGEN_DEPS\s*=\s*(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert m and m.group(1).split() == [f"'{req}'" for req in extra]


def test_import_resonant_in_a_source_tree_without_the_codec_says_what_to_run(tmp_path):
    tree = tmp_path / "clone"
    shutil.copytree(ROOT / "resonant", tree / "resonant",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "*.c", "*.html"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", "import resonant"], cwd=tree, capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: resonant: the compiled codec (resonant._codec) is not built"), r.stderr
    assert "make compile" in last and "another directory" in last, last
    assert "circular import" not in r.stderr


# ------------------------------------------------------------------ keygen, --version


def test_keygen_writes_a_key_that_key_from_file_reads_mode_0600(tmp_path):
    path = tmp_path / "k.key"
    r = run_cli("keygen", str(path))
    assert r.returncode == 0, r.stderr
    key = Key.from_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}\n", path.read_text())
    assert f"0x{key.key_id:08x}" in r.stderr
    before = path.read_bytes()
    r = run_cli("keygen", str(path))
    assert r.returncode != 0 and path.read_bytes() == before
    assert r.stderr.strip() == f"resonant keygen: {path} exists: a key file is never overwritten", r.stderr
    assert run_cli("keygen", str(tmp_path / "k2.key")).returncode == 0
    assert Key.from_file(tmp_path / "k2.key") != key


def test_keygen_into_a_missing_directory_is_one_line_not_a_traceback(tmp_path):
    r = run_cli("keygen", str(tmp_path / "no" / "such" / "k.key"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("resonant keygen: cannot write") and "No such file" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_recv_line_of_overflowing_values_warns_nothing():
    import warnings

    from resonant import cli
    big = resonant.decode(resonant.encode(resonant.Think(resonant.Slice.from_array(np.full((1, 64), 3e38, np.float32)))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning (overflow in the sums) would raise here
        line = cli.frame_line(big, None)
    assert "mean=" in line


def test_keygen_help_states_the_key_file_format():
    r = run_cli("keygen", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "64 hexadecimal" in text and "32 raw bytes" in text and "0600" in text


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert r.stdout.strip() == f"resonant {version}" == f"resonant {resonant.__version__}"


# ------------------------------------------------------------------ recv --save


def test_save_never_overwrites_two_streams_of_the_same_id(files, tmp_path):
    save = tmp_path / "out"
    save.mkdir()
    (save / "stream1_0000_keys.npy").write_bytes(b"mine")  # a file already there is left alone
    with receiver("tcp", "--json", "--count", "2", "--save", str(save)) as rx:
        for _ in range(2):
            r = run_cli("send", "--to", rx.url, str(files / "mid.npy"), "--type", "cache", "--stream-id", "1")
            assert r.returncode == 0, r.stderr
        assert rx.wait_exit() == 0, rx.dump()
    saved = [p for d in _json_lines(rx) if d["event"] == "stream_complete" for p in d["saved"]]
    assert len(saved) == len(set(saved)) == 4, rx.dump()
    assert (save / "stream1_0000_keys.npy").read_bytes() == b"mine"
    assert sorted(p.name for p in save.iterdir()) == sorted(
        ["stream1_0000_keys.npy", "stream1_0000_keys-1.npy", "stream1_0000_keys-2.npy",
         "stream1_0001_values.npy", "stream1_0001_values-1.npy"])
    want = np.load(files / "mid.npy")
    for p in saved:
        np.testing.assert_array_equal(np.load(p), want[0 if "keys" in p else 1])


@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_bad_save_dir_is_refused_before_listening(files, tmp_path, where):
    f = tmp_path / "plain.txt"
    f.write_text("x")
    target = f if where == "a_file" else f / "out"
    r = run_cli("recv", "--listen", f"udp://{HOST}:0", "--save", str(target), timeout=20)
    assert r.returncode == 2, r.stderr
    assert "listening" not in r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"resonant recv: --save {target}: cannot write files there"), line


# ------------------------------------------------------------------ rejected input


def test_a_refused_ping_is_rejected_not_a_message():
    """A ping the server refuses (here: another embedding space) is a FrameRejected, not a
    MessageReceived: the refused document must not look like an accepted message."""
    client = Session(SessionConfig(role="client", space_hash32=5))
    server = Session(SessionConfig(role="server", expected_space_hash=7))
    client.initiate(0.0)
    events = [e for d in client.datagrams_to_send() for e in server.receive_datagram(d, 0.0)]
    assert [type(e) for e in events] == [FrameRejected, HandshakeFailed], events
    assert events[0].reason == "ping_refused" and events[0].detail.startswith("SPACE_MISMATCH: ")


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_recv_json_prints_rejected_input_as_its_own_event(files, scheme):
    with receiver(scheme, "--json", "--key-file", str(files / "a.key")) as rx:
        r = run_cli("send", "--to", rx.url, str(files / "small.npy"), timeout=15)
        assert r.returncode == 1, r.stderr
        rx.wait_for(lambda: rx.rejected, "a rejected event")
        docs = _json_lines(rx)
    assert not any(d["event"] == "message" for d in docs), docs
    rej = [d for d in docs if d["event"] == "rejected"]
    assert rej and rej[0]["reason"] == "not_encrypted" and rej[0]["peer"].startswith("127.0.0.1:"), docs
    assert "--key-file" in rej[0]["detail"] and "Codec(" not in rej[0]["detail"]


def test_recv_human_output_prints_rejected_input_as_rejected(files):
    with receiver("udp", "--space-hash", "7") as rx:
        r = run_cli("send", "--to", rx.url, str(files / "small.npy"), "--space-hash", "5", timeout=15)
        assert r.returncode == 1, r.stderr
        rx.wait_for(lambda: rx.rejected, "a rejected line")
    assert rx.stdout == [], rx.dump()  # the refused ping is not printed as a [SYNC] message
    assert "[REJECTED] (ping_refused) SPACE_MISMATCH: " in rx.rejected[0], rx.dump()


# ------------------------------------------------------------------ error texts


def test_wrong_key_texts_speak_the_cli_language(files):
    other = Key.from_file(files / "b.key").key_id
    mine = Key.from_file(files / "a.key").key_id
    with receiver("udp", "--key-file", str(files / "a.key")) as rx:
        r = run_cli("send", "--to", rx.url, str(files / "small.npy"), "--key-file", str(files / "b.key"),
                    timeout=20)
        assert r.returncode == 1, r.stderr
        rx.wait_stderr("rejected")
    last = r.stderr.strip().splitlines()[-1]
    assert "Keyring(" not in last and "Keyring(" not in "\n".join(rx.stderr), (last, rx.dump())
    assert f"0x{other:08x}" in last and "the same key file on both sides" in last, last
    line = next(x for x in rx.stderr if "rejected" in x)
    assert "malformed" not in line and "(wrong key)" in line and f"0x{mine:08x}" in line, line


def test_keyless_sender_to_a_keyed_receiver_is_told_what_to_do(files):
    with receiver("tcp", "--key-file", str(files / "a.key")) as rx:
        r = run_cli("send", "--to", rx.url, str(files / "small.npy"), timeout=15)
        assert r.returncode == 1
        rx.wait_stderr("rejected")
    assert "send with --key-file" in r.stderr.strip().splitlines()[-1], r.stderr
    text = "\n".join(rx.stderr)
    assert "Codec(" not in text and "send with --key-file, or start recv without --key-file" in text, text


def test_space_mismatch_says_what_each_side_expected(files):
    with receiver("tcp", "--space-hash", "0x1234") as rx:
        r = run_cli("send", "--to", rx.url, str(files / "small.npy"), "--space-hash", "0x99", timeout=15)
        assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert "SPACE_MISMATCH" in last and "0x00001234" in last and "0x00000099" in last, last


@pytest.mark.parametrize("option", ["--space-hash", "--stream-id"])
def test_a_bad_number_is_named(files, option):
    r = run_cli("send", "--to", f"tcp://{HOST}:9", str(files / "small.npy"), option, "xyz")
    assert r.returncode == 2
    assert "_u32" not in r.stderr and "xyz is not a number" in r.stderr, r.stderr


def test_count_0_is_refused():
    r = run_cli("recv", "--listen", f"udp://{HOST}:0", "--count", "0")
    assert r.returncode == 2 and "--count" in r.stderr and "at least 1" in r.stderr, r.stderr
    assert "at least 1" in " ".join(run_cli("recv", "--help").stdout.split())


def test_send_of_a_file_that_is_not_npy_says_so(files):
    r = run_cli("send", "--to", f"tcp://{HOST}:9", str(files / "notes.txt"))
    assert r.returncode != 0
    assert "pickle" not in r.stderr and "is not a .npy file" in r.stderr, r.stderr


# ------------------------------------------------------------------ recv and send output


def test_recv_prints_handshake_documents_whole(files):
    with receiver("udp", "--count", "1") as rx:
        assert run_cli("send", "--to", rx.url, str(files / "small.npy")).returncode == 0
        assert rx.wait_exit() == 0, rx.dump()
    [sync] = [x for x in rx.stdout if "[SYNC]" in x]
    doc = json.loads(sync[sync.index("{"):])  # the whole document, not cut mid-JSON
    assert doc["method"] == "ping"


def test_recv_json_names_the_dtypes_beside_their_codes(files, tmp_path):
    with receiver("tcp", "--json", "--count", "2", "--save", str(tmp_path / "o")) as rx:
        assert run_cli("send", "--to", rx.url, str(files / "small.npy")).returncode == 0
        assert run_cli("send", "--to", rx.url, str(files / "mid.npy"), "--type", "cache").returncode == 0
        assert rx.wait_exit() == 0, rx.dump()
    docs = _json_lines(rx)
    think = next(d for d in docs if d["event"] == "message" and d["msg_type"] == MsgType.THINK)
    assert [(s["dtype"], s["dtype_name"]) for s in think["slices"]] == [(1, DTYPE_WIRE_NAMES[1])]
    done = next(d for d in docs if d["event"] == "stream_complete")
    assert [(o["dtype"], o["dtype_name"]) for o in done["objects"]] == [(1, DTYPE_WIRE_NAMES[1])] * 2


def test_send_progress_without_a_tty_is_one_line_and_reports_wire_bytes(files):
    with receiver("tcp", "--count", "1") as rx:
        r = run_cli("send", "--to", rx.url, str(files / "big.npy"), "--type", "cache", "--zstd", timeout=60)
        assert r.returncode == 0, r.stderr
        assert rx.wait_exit(30) == 0, rx.dump()
    bars = [x for x in r.stderr.splitlines() if x.startswith("[")]
    assert len(bars) == 1 and "100.0%" in bars[0], r.stderr
    m = re.search(r"(\d+) bytes on the wire \(zstd: ([\d.]+)% of the raw size\)", r.stderr)
    assert m, r.stderr
    assert 0 < int(m.group(1)) and abs(int(m.group(1)) / (8 << 20) * 100 - float(m.group(2))) < 0.1


def test_send_progress_without_a_tty_is_one_line_for_a_plain_stream(files):
    """The same without zstd, one object (the stream's last chunk and its completion both report
    100%: printed once)."""
    with receiver("tcp", "--count", "1") as rx:
        r = run_cli("send", "--to", rx.url, str(files / "big.npy"), timeout=60)
        assert r.returncode == 0, r.stderr
        assert rx.wait_exit(30) == 0, rx.dump()
    bars = [x for x in r.stderr.splitlines() if x.startswith("[")]
    assert len(bars) == 1 and "100.0%" in bars[0], r.stderr
    assert re.search(r"\d+ bytes on the wire$", r.stderr.strip()), r.stderr


def test_send_of_one_frame_reports_wire_bytes(files):
    with receiver("udp", "--count", "1") as rx:
        r = run_cli("send", "--to", rx.url, str(files / "small.npy"))
        assert r.returncode == 0, r.stderr
        assert rx.wait_exit() == 0, rx.dump()
    want = len(resonant.encode(resonant.Think(np.load(files / "small.npy"), stream_id=1)))
    assert re.search(rf"sent THINK float16\[1, 64\] \(128 bytes\) to {re.escape(rx.url)}: {want} bytes on the "
                     "wire", r.stderr), r.stderr
