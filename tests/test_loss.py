"""V-Streams over impaired UDP, between real processes: a `resonant recv` process behind the
deterministic impairment relay (resonant.relay, its own process), this process sending with
connect()/send_stream(). Each stream must arrive bit-exact (the receiver's verified xxh3_64 is the
sender's, and send_stream() returns only on that verdict) at 0, 1, 5 and 20% loss; a receiver
that vanishes mid-stream makes the sender fail within its feedback deadline."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import resonant
from resonant import _codec
from resonant.aio import DeliveryFailed
from resonant.relay import Impairment, Relay

pytestmark = [pytest.mark.slow, pytest.mark.pure_skip]

_MIB = 1 << 20


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recv_process(port: int, *args: str, scheme: str = "udp") -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "resonant.cli", "recv", "--listen", f"{scheme}://127.0.0.1:{port}",
                          "--json", "--count", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    line = p.stderr.readline()  # "listening on ..."
    assert "listening on" in line, line + p.stderr.read()
    return p


def _wait_for_handshake(p: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until the `resonant recv` process says it completed a handshake (the sender is streaming)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([p.stderr], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = p.stderr.readline()
        if not line:
            break
        if "handshake:" in line:
            return
    raise AssertionError(f"no handshake reached the receiver within {timeout} s")


def _tensor(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(nbytes // 2, dtype=np.float32).astype(np.float16)


def _send_through(relay: Relay, x: np.ndarray, **kwargs) -> tuple[float, resonant.Session]:
    async def go():
        async with resonant.connect(f"udp://127.0.0.1:{relay.address[1]}", timeout=10.0,
                                    **kwargs.pop("config", {})) as peer:
            t = time.perf_counter()
            await peer.send_stream([x], **kwargs)
            return time.perf_counter() - t, peer.session
    return asyncio.run(go())


def _completed(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    (done,) = [json.loads(line) for line in out.splitlines() if '"stream_complete"' in line]
    return done


@pytest.mark.parametrize("mib, frame", [(64, 65507), (64, 1200), (256, 65507)])
@pytest.mark.parametrize("loss", [0.0, 0.01, 0.05, 0.2])
def test_streams_arrive_bit_exact_through_loss(loss, mib, frame):
    x = _tensor(mib * _MIB, seed=int(loss * 100) + frame + mib)  # (64 MiB in 1,200-byte frames: 58,000 datagrams)
    port = _free_udp_port()
    p = _recv_process(port)
    try:
        imp = Impairment(loss=loss, seed=17)
        with Relay.start(("127.0.0.1", port), forward=imp, backward=Impairment(loss=loss, seed=18)) as relay:
            seconds, session = _send_through(relay, x, config={"max_frame_bytes": frame})
            stats = relay.stats()
        done = _completed(p)
    finally:
        p.kill()
    assert done["nbytes"] == x.nbytes
    assert done["xxh3_64"] == f"{_codec.xxh3_64(x):016x}"  # bit-exact (and send_stream saw the same verdict)
    if loss:
        assert stats["forward"]["dropped"] > 0  # the relay did lose datagrams


def test_256_mib_arrive_bit_exact_at_5_percent_bursty_loss_with_reordering_and_duplicates():
    x = _tensor(256 * _MIB, seed=3)
    port = _free_udp_port()
    p = _recv_process(port)
    try:
        fwd = Impairment(loss=0.05, burst=3.0, dup=0.01, reorder=0.01, seed=4)
        with Relay.start(("127.0.0.1", port), forward=fwd, backward=Impairment(loss=0.05, seed=5)) as relay:
            seconds, session = _send_through(relay, x)
        done = _completed(p)
    finally:
        p.kill()
    assert done["xxh3_64"] == f"{_codec.xxh3_64(x):016x}"


def test_saved_file_is_bit_exact_after_loss(tmp_path):
    x = _tensor(8 * _MIB, seed=9)
    port = _free_udp_port()
    p = _recv_process(port, "--save", str(tmp_path))
    try:
        with Relay.start(("127.0.0.1", port), forward=Impairment(loss=0.1, seed=2)) as relay:
            _send_through(relay, x, names=["x"])
        done = _completed(p)
    finally:
        p.kill()
    (path,) = done["saved"]
    assert np.load(path).tobytes() == x.tobytes()


def test_a_receiver_that_vanishes_mid_stream_fails_the_sender_within_its_deadline():
    x = _tensor(64 * _MIB, seed=11)
    port = _free_udp_port()
    p = _recv_process(port)
    try:
        with Relay.start(("127.0.0.1", port)) as relay:
            async def go():
                async with resonant.connect(f"udp://127.0.0.1:{relay.address[1]}", feedback_timeout=2.0) as peer:
                    asyncio.get_running_loop().call_later(0.1, p.kill)  # the receiver dies 0.1 s in
                    t = time.perf_counter()
                    with pytest.raises(DeliveryFailed) as exc:
                        await peer.send_stream([x], rate=50e6)  # (~1.3 s of sending at 50 MB/s)
                    return time.perf_counter() - t, exc.value
            seconds, exc = asyncio.run(go())
    finally:
        p.kill()
        p.communicate()
    assert exc.reason == "no_feedback" and not exc.remote
    assert seconds < 2.0 + 1.4 + 1.0  # the feedback deadline after the last report, not the whole stream's time


def test_cli_send_exits_1_with_one_line_when_the_receiver_dies_mid_stream(tmp_path):
    x = _tensor(64 * _MIB, seed=12)
    np.save(tmp_path / "x.npy", x)
    port = _free_udp_port()
    p = _recv_process(port)
    try:
        with Relay.start(("127.0.0.1", port)) as relay:
            s = subprocess.Popen([sys.executable, "-m", "resonant.cli", "send", "--to",
                                  f"udp://127.0.0.1:{relay.address[1]}", str(tmp_path / "x.npy"), "--rate", "20M"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _wait_for_handshake(p)  # (a loaded machine takes a while to start the sender)
            time.sleep(0.5)
            p.kill()
            out, err = s.communicate(timeout=30)
    finally:
        p.kill()
        p.communicate()
    assert s.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("resonant send: stream") and "no_feedback" in last, err


def test_resonant_relay_is_a_cli_command():
    r = subprocess.run([sys.executable, "-m", "resonant.cli", "relay", "--help"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and "--loss" in r.stdout and "--seed" in r.stdout


_FULL_DISK_RECV = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)            # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
from resonant.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_send_exits_1_when_the_receiver_cannot_save_what_it_verified(tmp_path):
    # the receiver verified the stream but could not write it (its disk is "full"): the sender says so
    np.save(tmp_path / "x.npy", _tensor(8 * _MIB, seed=13))
    port = _tcp_port()
    p = subprocess.Popen([sys.executable, "-c", _FULL_DISK_RECV, "recv", "--listen", f"tcp://127.0.0.1:{port}",
                          "--count", "1", "--save", str(tmp_path / "out")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert "listening on" in p.stderr.readline()
    s = subprocess.run([sys.executable, "-m", "resonant.cli", "send", "--to", f"tcp://127.0.0.1:{port}",
                        str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=60)
    out, err = p.communicate(timeout=30)
    assert s.returncode == 1, s.stderr
    last = s.stderr.strip().splitlines()[-1]
    assert last.startswith("resonant send: stream 1: the receiver refused: save_failed:"), s.stderr
    assert p.returncode == 1 and "not saved" in err, err


def test_cli_send_over_tcp_exits_1_when_the_receiver_dies_mid_stream(tmp_path):
    np.save(tmp_path / "x.npy", _tensor(64 * _MIB, seed=14))
    port = _tcp_port()
    p = _recv_process(port, scheme="tcp")
    s = subprocess.Popen([sys.executable, "-m", "resonant.cli", "send", "--to", f"tcp://127.0.0.1:{port}",
                          str(tmp_path / "x.npy"), "--rate", "20M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    _wait_for_handshake(p)
    time.sleep(0.5)
    p.kill()
    p.communicate()
    out, err = s.communicate(timeout=30)
    assert s.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("resonant send:") and "closed" in last, err


def test_cli_send_with_fec_through_loss(tmp_path):
    x = _tensor(16 * _MIB, seed=15)
    np.save(tmp_path / "x.npy", x)
    port = _free_udp_port()
    p = _recv_process(port)
    try:
        with Relay.start(("127.0.0.1", port), forward=Impairment(loss=0.05, seed=6)) as relay:
            s = subprocess.run([sys.executable, "-m", "resonant.cli", "send", "--to",
                                f"udp://127.0.0.1:{relay.address[1]}", str(tmp_path / "x.npy"), "--fec", "16,2"],
                               capture_output=True, text=True, timeout=60)
        done = _completed(p)
    finally:
        p.kill()
    assert s.returncode == 0, s.stderr
    assert "verified by the receiver" in s.stderr
    assert done["xxh3_64"] == f"{_codec.xxh3_64(x):016x}"
