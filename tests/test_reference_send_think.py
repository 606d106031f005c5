"""The reference's UDP sender example (bin/send_think) -> `resonant recv` (issue 16: the CLI both ways).

bin/send_think sends a Sync ping, a Think (F16 [1, 2048], the ZSTD flag set over a raw body) and a
2-slice Critique (F16 divergence, I8 explanation) to 127.0.0.1:50051, its fixed port, from a
connected UDP socket: it fails with "Connection refused" when nothing listens there.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT

REF_BIN = ROOT.parent / "shared" / "reference-rust" / "bin"
ADDR = ("127.0.0.1", 50051)

pytestmark = pytest.mark.skipif(not (REF_BIN / "send_think").exists(),
                                reason="../shared/reference-rust (the reference's Rust build) is not beside this checkout")


def _port_free() -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind(ADDR)
        return True
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return False
        raise
    finally:
        probe.close()


def test_resonant_recv_reads_the_reference_sender():
    if not _port_free():
        pytest.skip("127.0.0.1:50051 (bin/send_think's fixed port) is busy")
    recv = subprocess.Popen([sys.executable, "-m", "resonant.cli", "recv", "--listen", "udp://127.0.0.1:50051", "--json",
                             "--count", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        # the receiver says "listening on ..." on stderr once its socket is bound
        deadline = time.monotonic() + 30
        line = b""
        while b"listening on" not in line and time.monotonic() < deadline:
            line = recv.stderr.readline()
            if not line:
                break
        assert b"listening on udp://127.0.0.1:50051" in line, line
        sent = subprocess.run([str(REF_BIN / "send_think")], capture_output=True, timeout=30)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        out, err = recv.communicate(timeout=30)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.communicate()
    assert recv.returncode == 0, err
    events = [json.loads(x) for x in out.decode().splitlines() if x.strip()]
    messages = [e for e in events if e.get("event") == "message"]
    by_type = {e["msg_type"]: e for e in messages}
    # the ping is printed as a handshake document; the Think and the Critique are the two counted messages
    assert by_type[3]["document"]["method"] == "ping"
    think, critique = by_type[0], by_type[4]
    assert think["version"] == 1 and think["frame_seq"] == 1 and think["flags"] == 1  # ZSTD set, body raw
    assert [(s["dtype"], s["shape"], s["payload_len"]) for s in think["slices"]] == [(1, [1, 2048], 4096)]
    assert critique["frame_seq"] == 2
    assert [(s["dtype"], s["shape"]) for s in critique["slices"]] == [(1, [16]), (2, [55])]
    assert len({e["stream_id"] for e in messages}) == 1
    assert len({e["space_hash32"] for e in messages}) == 1
