"""resonant.relay: the impairment model's decisions (deterministic, with the asked-for long-run
loss, burst length, duplicates, reordering and bottleneck rate), and the relay process through
real sockets on 127.0.0.1 (both directions forwarded, the model's losses applied exactly, clients
kept apart, the CLI)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from resonant.relay import Impairment, ImpairmentModel, Relay


def decisions(imp: Impairment, n: int, direction: str = "forward", size=lambda i: 1200, step: float = 1e-4):
    model = ImpairmentModel(imp, direction)
    return [tuple(model.admit(size(i), i * step)) for i in range(n)], model.stats


# -- the model ---------------------------------------------------------------------------------

MIXED = Impairment(loss=0.1, burst=3, dup=0.05, reorder=0.05, delay=0.01, jitter=0.001, seed=7)


def test_same_seed_same_decisions_different_seed_different():
    a, _ = decisions(MIXED, 5000)
    b, _ = decisions(MIXED, 5000)
    c, _ = decisions(Impairment(**{**MIXED.__dict__, "seed": 8}), 5000)
    assert a == b
    assert a != c
    assert [bool(x) for x in a] != [bool(x) for x in c]  # the losses differ too, not only the jitter


def test_the_two_directions_decide_independently():
    fwd, _ = decisions(MIXED, 5000, "forward")
    bwd, _ = decisions(MIXED, 5000, "backward")
    assert [bool(x) for x in fwd] != [bool(x) for x in bwd]


def test_decisions_for_a_datagram_do_not_depend_on_the_sizes_before_it():
    """Without a bottleneck, which datagrams are lost depends only on the seed and their index."""
    imp = Impairment(loss=0.2, burst=2, dup=0.1, seed=3)
    a, _ = decisions(imp, 3000, size=lambda i: 100)
    b, _ = decisions(imp, 3000, size=lambda i: 60000 if i % 3 else 1)
    assert [len(x) for x in a] == [len(x) for x in b]


def test_perfect_path_delivers_everything_at_once():
    out, st = decisions(Impairment(), 1000)
    assert out == [(i * 1e-4,) for i in range(1000)]
    assert (st.datagrams_in, st.delivered, st.dropped, st.duplicated, st.reordered) == (1000, 1000, 0, 0, 0)


def test_independent_loss_long_run_rate():
    n = 100_000
    out, st = decisions(Impairment(loss=0.05, seed=11), n)
    lost = sum(1 for x in out if not x)
    assert lost == st.dropped
    assert abs(lost / n - 0.05) < 0.005  # sd 0.0007
    # independent losses: mean run of consecutive losses 1 / (1 - p)
    assert abs(st.dropped / st.loss_bursts - 1 / 0.95) < 0.05


@pytest.mark.parametrize("loss,burst", [(0.1, 4.0), (0.02, 2.0), (0.3, 10.0)])
def test_bursty_loss_long_run_rate_and_mean_burst_length(loss, burst):
    n = 200_000
    out, st = decisions(Impairment(loss=loss, burst=burst, seed=5), n)
    runs, run = [], 0
    for x in out:
        if not x:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    assert abs(st.dropped / n - loss) < 0.2 * loss
    assert st.loss_bursts >= len(runs) >= st.loss_bursts - 1
    assert abs(sum(runs) / len(runs) - burst) < 0.1 * burst


def test_total_loss_drops_everything_with_bursts_too():
    for burst in (1, 5):
        out, st = decisions(Impairment(loss=1.0, burst=burst), 500)
        assert not any(out) and st.dropped == 500


def test_duplicates_and_reordering_counts_and_times():
    n = 20_000
    imp = Impairment(dup=0.1, reorder=0.2, reorder_delay=0.002, delay=0.005, seed=2)
    out, st = decisions(imp, n, step=1e-3)
    doubles = [x for x in out if len(x) == 2]
    assert len(doubles) == st.duplicated and abs(st.duplicated / n - 0.1) < 0.01
    assert abs(st.reordered / n - 0.2) < 0.015
    assert st.delivered == n + st.duplicated and st.dropped == 0
    held = sum(1 for i, x in enumerate(out) if x[0] == pytest.approx(i * 1e-3 + 0.005 + 0.002))
    assert held == st.reordered
    assert all(x[-1] == pytest.approx(i * 1e-3 + 0.005) for i, x in enumerate(out) if len(x) == 2)


def test_reordered_datagrams_are_overtaken():
    out, st = decisions(Impairment(reorder=0.3, reorder_delay=0.002, seed=4), 2000, step=1e-4)
    order = sorted(range(len(out)), key=lambda i: out[i][0])
    assert order != list(range(len(out)))
    assert st.reordered > 0


def test_bottleneck_rate_and_drop_tail_queue():
    rate, size, queue = 1_000_000, 1000, 20_000
    model = ImpairmentModel(Impairment(rate=rate, queue_bytes=queue), "forward")
    times = [model.admit(size, i * 0.0005) for i in range(4000)]  # offered 2 MB/s for 2 s
    delivered = sorted(t[0] for t in times if t)
    span = delivered[-1] - delivered[0]
    assert (len(delivered) - 1) * size / span == pytest.approx(rate, rel=0.01)
    assert min(b - a for a, b in zip(delivered, delivered[1:])) >= size / rate - 1e-9
    assert model.stats.queue_drops == 4000 - len(delivered)
    assert abs(model.stats.queue_drops / 4000 - 0.5) < 0.02
    # queueing delay never exceeds queue / rate (+ one datagram's serialization)
    assert max(t[0] - i * 0.0005 for i, t in enumerate(times) if t) <= (queue + size) / rate + 1e-9


def test_bottleneck_below_rate_only_adds_serialization():
    model = ImpairmentModel(Impairment(rate=1_000_000, delay=0.01), "forward")
    times = [model.admit(500, i * 0.001) for i in range(1000)]  # 0.5 MB/s offered
    assert model.stats.queue_drops == 0
    assert all(t == [pytest.approx(i * 0.001 + 0.0005 + 0.01)] for i, t in enumerate(times))


@pytest.mark.parametrize("kwargs,words", [
    ({"loss": -0.1}, "loss is a probability"),
    ({"loss": float("nan")}, "loss must be a finite number"),
    ({"dup": 1.5}, "dup is a probability"),
    ({"burst": 0.5}, "burst is a mean burst length"),
    ({"loss": 0.8, "burst": 2}, "too high for bursts"),
    ({"delay": -1}, "delay is in seconds"),
    ({"rate": 0}, "rate is in bytes/s"),
    ({"queue_bytes": 0}, "queue_bytes must be a positive int"),
    ({"seed": "x"}, "seed must be an int"),
])
def test_impairment_validation(kwargs, words):
    with pytest.raises(ValueError, match=words) as info:
        Impairment(**kwargs)
    assert "\n" not in str(info.value)


# -- the relay through sockets ------------------------------------------------------------------

class Echo:
    """A UDP target in a thread: records what it receives and echoes it back prefixed."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # the relay writes faster than we read
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()
        self.received: list[bytes] = []
        self.peers: set = set()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            self.received.append(data)
            self.peers.add(addr)
            self.sock.sendto(b"echo:" + data, addr)

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.close()


def client_socket():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2.0)
    return s


def receive_all(sock, quiet: float = 0.3) -> list[bytes]:
    """What arrives until nothing has for `quiet` seconds."""
    out = []
    sock.settimeout(quiet)
    try:
        while True:
            out.append(sock.recv(65535))
    except socket.timeout:
        return out


def test_relay_forwards_both_ways(echo):
    with Relay.start(echo.address) as relay:
        c = client_socket()
        payloads = [b"%d" % i + bytes(i * 100) for i in range(60)]  # up to ~6 KB
        for p in payloads:
            c.sendto(p, relay.address)
        back = receive_all(c)
        stats = relay.stats()
    assert sorted(echo.received) == sorted(payloads)
    assert sorted(back) == sorted(b"echo:" + p for p in payloads)
    assert echo.peers and relay.address not in echo.peers  # the target sees the relay's per-client socket
    assert stats["forward"]["datagrams_in"] == stats["backward"]["datagrams_in"] == 60
    assert stats["clients"] == 1 and stats["send_errors"] == 0
    assert relay.stop() is relay.final_stats  # stopping twice is fine


def test_relay_drops_exactly_what_the_model_decides(echo):
    imp = Impairment(loss=0.3, burst=2, seed=5)
    payloads = [b"p%04d" % i for i in range(300)]
    model = ImpairmentModel(imp, "forward")
    expected = [p for p in payloads if model.admit(len(p), 0.0)]
    with Relay.start(echo.address, forward=imp, backward=Impairment()) as relay:
        c = client_socket()
        for p in payloads:
            c.sendto(p, relay.address)
        back = receive_all(c)
        stats = relay.stats()
    assert echo.received == expected  # no reordering asked for: also in order
    assert back == [b"echo:" + p for p in expected]
    assert stats["forward"]["dropped"] == 300 - len(expected) > 50
    assert stats["backward"]["dropped"] == 0


def test_relay_applies_delay_and_duplicates_backward(echo):
    with Relay.start(echo.address, forward=Impairment(delay=0.05),
                     backward=Impairment(dup=1.0, seed=1)) as relay:
        c = client_socket()
        t0 = time.monotonic()
        c.sendto(b"x", relay.address)
        first = c.recv(100)
        elapsed = time.monotonic() - t0
        second = c.recv(100)
    assert first == second == b"echo:x"
    assert elapsed >= 0.05  # a lower bound only: the forward delay was applied


def test_relay_keeps_two_clients_apart(echo):
    with Relay.start(echo.address) as relay:
        a, b = client_socket(), client_socket()
        for i in range(20):
            a.sendto(b"A%d" % i, relay.address)
            b.sendto(b"B%d" % i, relay.address)
        got_a, got_b = receive_all(a), receive_all(b)
        stats = relay.stats()
    assert sorted(got_a) == sorted(b"echo:A%d" % i for i in range(20))
    assert sorted(got_b) == sorted(b"echo:B%d" % i for i in range(20))
    assert len(echo.peers) == 2 and stats["clients"] == 2


def test_relay_start_rejects_what_is_not_an_impairment():
    with pytest.raises(TypeError, match="forward must be an Impairment"):
        Relay.start(("127.0.0.1", 9), forward={"loss": 0.1})


def test_cli_relays_until_interrupted(echo):
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "resonant.relay", "--listen", "127.0.0.1:0",
                             "--to", "%s:%d" % echo.address, "--loss", "0", "--seed", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("relay 127.0.0.1:") and line.rstrip().endswith("-> %s:%d" % echo.address)
        port = int(line.split()[1].rsplit(":", 1)[1])
        c = client_socket()
        c.sendto(b"hello", ("127.0.0.1", port))
        assert c.recv(100) == b"echo:hello"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "'datagrams_in': 1" in err


def test_cli_rejects_a_bad_impairment_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "resonant.relay", "--to", "127.0.0.1:9", "--loss", "2"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "loss is a probability" in proc.stderr
