"""QUIC (aioquic) over an impaired path, for comparison with resonant's V-Streams over UDP.

One QUIC connection, one QUIC stream carrying the bytes of a float16 numpy tensor from a client
process to a server process through a `resonant.relay.Relay` (its own process) that impairs both
directions; the server checks the bytes (xxh3-64 against the value the caller computed) and
answers on the same stream. A self-signed certificate (EC P-256, for 127.0.0.1) is made at run
time in a temporary directory; nothing leaves the loopback interface.

    from bench_quic import quic_transfer
    quic_transfer(64 << 20, forward=Impairment(loss=0.01, seed=1), backward=Impairment(seed=2), timeout=120)

Run from the repository root for the table (loss 0, 1, 5, 20% both ways, 64 MiB):

    python3 bench/bench_quic.py [--mib 64] [--loss 0,0.01,0.05,0.2] [--timeout 300] [--cc reno|cubic]
                                [--datagram-size 1200] [--json PATH|-]

aioquic's own loss recovery and congestion control (Reno by default, or Cubic) apply; its flow
control windows are raised to 16 MiB per connection and per stream (the 1 MiB defaults would cap
the rate instead of the path), its UDP sockets get 8 MiB buffers as the relay's have, and its
datagrams are `--datagram-size` bytes of QUIC payload (aioquic's default, 1,200).
Needs the `bench-net` extra (aioquic).

Measured on the 2-core dev machine (shared, load 2-5; aioquic 1.7.2, Reno, 64 MiB, loss both ways):
0%: 5.6 s, 12.1 MB/s; 1%: 10.0 s, 6.7 MB/s; 5%: 34 s, 2.0 MB/s; 20%: 40 of 64 MiB in 300 s
(~0.14 MB/s, not finished). Peak RSS ~190 MiB client, ~185 MiB server. At 0% both ends are
CPU-bound (3.7 + 5.9 CPU-s for 64 MiB); from 5% on, the congestion control is the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import resource
import select
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from resonant._codec import xxh3_64  # noqa: E402
from bench_codec import peak_rss_mb, write_json  # noqa: E402
from resonant.relay import Impairment, Relay  # noqa: E402

ALPN = "resonant-bench"
FLOW_WINDOW = 16 << 20
SOCKET_BUFFER = 8 << 20


def tensor_bytes(nbytes: int, seed: int = 0) -> bytes:
    """The payload: the bytes of a float16 tensor of nbytes // 2 normal values (nbytes even),
    made 1 Mi values at a time (no float32 copy of the whole: the client's peak RSS is the
    tensor and its bytes, 2 x nbytes, plus what aioquic holds)."""
    rng = np.random.default_rng(seed)
    out = np.empty(nbytes // 2, np.float16)
    step = 1 << 20
    for i in range(0, out.size, step):
        out[i:i + step] = rng.standard_normal(min(step, out.size - i), dtype=np.float32)
    return out.tobytes()


def make_certificate(directory: str) -> tuple[str, str]:
    """A self-signed EC P-256 certificate for 127.0.0.1/localhost: (cert.pem, key.pem) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def _config(is_client: bool, cc: str, datagram_size: int):
    from aioquic.quic.configuration import QuicConfiguration

    return QuicConfiguration(is_client=is_client, alpn_protocols=[ALPN], max_data=FLOW_WINDOW,
                             max_stream_data=FLOW_WINDOW, congestion_control_algorithm=cc,
                             max_datagram_size=datagram_size, idle_timeout=30.0)


def _big_buffers(transport) -> None:
    import socket

    sock = transport.get_extra_info("socket")
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass


def _peak_rss_mb() -> float:
    return peak_rss_mb()  # (VmHWM: ru_maxrss would include the parent's memory at fork)


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _emit(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- the server process ------------------------------------------------------------------------

async def _serve(args) -> None:
    from aioquic.asyncio import QuicConnectionProtocol, serve
    from aioquic.quic.events import StreamDataReceived

    done = asyncio.get_running_loop().create_future()
    expected = int(args.xxh3, 16)

    class Receiver(QuicConnectionProtocol):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.buf = bytearray(args.nbytes)
            self.got = 0
            self.first = None

        def quic_event_received(self, event):
            if not isinstance(event, StreamDataReceived):
                return
            n = len(event.data)
            if n:
                if self.first is None:
                    self.first = time.perf_counter()
                if self.got + n > args.nbytes:
                    raise RuntimeError("more bytes than announced")
                self.buf[self.got:self.got + n] = event.data
                self.got += n
            if event.end_stream:
                ok = self.got == args.nbytes and xxh3_64(self.buf) == expected
                verified = time.perf_counter()
                result = {"ok": ok, "received": self.got, "seconds": verified - self.first,
                          "rss_mb": _peak_rss_mb(), "cpu_s": _cpu_s()}
                self._quic.send_stream_data(event.stream_id, json.dumps(result).encode(), end_stream=True)
                self.transmit()
                if not done.done():
                    done.set_result(result)

    config = _config(False, args.cc, args.datagram_size)
    config.load_cert_chain(args.cert, args.key)
    protocols: list = []

    def create(*a, **kw):
        p = Receiver(*a, **kw)
        protocols.append(p)
        return p

    server = await serve("127.0.0.1", 0, configuration=config, create_protocol=create)
    _big_buffers(server._transport)
    _emit({"port": server._transport.get_extra_info("sockname")[1]})
    try:
        result = await asyncio.wait_for(done, args.timeout)
        await asyncio.sleep(0.5)  # let the answer reach the client (and be retransmitted if lost)
    except asyncio.TimeoutError:
        got = max((p.got for p in protocols), default=0)
        result = {"ok": False, "received": got, "seconds": None, "rss_mb": _peak_rss_mb(), "cpu_s": _cpu_s(),
                  "timeout": True}
    _emit({"result": result})
    server.close()


# -- the client process ------------------------------------------------------------------------

async def _send(args) -> None:
    from aioquic.asyncio import connect

    data = tensor_bytes(args.nbytes, args.seed)
    cpu0 = _cpu_s()  # the process's CPU time from here on: the connection and the transfer
    config = _config(True, args.cc, args.datagram_size)
    config.load_verify_locations(args.cert)
    config.server_name = "127.0.0.1"
    t_connect = time.perf_counter()
    async with connect(args.host, args.port, configuration=config) as client:
        _big_buffers(client._transport)
        t0 = time.perf_counter()
        reader, writer = await client.create_stream()
        writer.write(data)
        writer.write_eof()
        del data
        answer = await reader.read()
        t1 = time.perf_counter()
        stats = client._quic._loss  # aioquic's recovery state (information only)
        _emit({"handshake_s": t0 - t_connect, "client_seconds": t1 - t0, "answer": json.loads(answer),
               "rss_mb": _peak_rss_mb(), "cwnd": getattr(stats, "congestion_window", None),
               "cpu_s": _cpu_s() - cpu0})


# -- the parent ---------------------------------------------------------------------------------

def _read_json(proc: subprocess.Popen, deadline: float) -> dict | None:
    while True:
        wait = deadline - time.monotonic()
        if wait <= 0:
            return None
        ready, _, _ = select.select([proc.stdout], [], [], wait)
        if not ready:
            return None
        line = proc.stdout.readline()
        if not line:
            return None
        try:
            return json.loads(line)
        except ValueError:
            continue


def quic_transfer(nbytes: int, forward: Impairment, backward: Impairment, timeout: float, *,
                  cc: str = "reno", datagram_size: int = 1200, seed: int = 0) -> dict:
    """Send `nbytes` (a float16 tensor's bytes) over one QUIC stream, client process -> server
    process, through a Relay impairing client -> server with `forward` and server -> client with
    `backward`. Returns a dict:

    ok:          the server received exactly the bytes sent (xxh3-64) within `timeout` seconds
    seconds:     from the first stream byte the server received to the bytes verified
    goodput_MBps: nbytes / seconds / 1e6
    client_seconds: from the client opening the stream to the server's answer arriving
    handshake_s: the QUIC handshake through the relay
    rss_client_mb, rss_server_mb: peak RSS of each process (MiB)
    cpu_client_s, cpu_server_s: CPU seconds of each process (the client's from the connection on;
                 the server's whole life): on a loaded machine, what the transfer cost in CPU
    received:    stream bytes the server had when it finished or gave up
    relay:       the relay's counters (per direction: datagrams_in, dropped, duplicated, ...)
    """
    if nbytes <= 0 or nbytes % 2:
        raise ValueError(f"nbytes must be a positive even number (a float16 tensor), got {nbytes}")
    expected = xxh3_64(tensor_bytes(nbytes, seed))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    me = os.path.abspath(__file__)
    deadline = time.monotonic() + timeout + 30
    common = ["--nbytes", str(nbytes), "--cc", cc, "--datagram-size", str(datagram_size)]
    out: dict = {"nbytes": nbytes, "ok": False, "forward": repr(forward), "backward": repr(backward), "cc": cc}
    with tempfile.TemporaryDirectory(prefix="resonant-quic-") as tmp:
        cert, key = make_certificate(tmp)
        server = subprocess.Popen([sys.executable, me, "--role", "server", "--cert", cert, "--key", key,
                                   "--xxh3", f"{expected:016x}", "--timeout", str(timeout)] + common,
                                  stdout=subprocess.PIPE, text=True, env=env)
        client = relay = None
        try:
            hello = _read_json(server, time.monotonic() + 30)
            if not hello or "port" not in hello:
                raise RuntimeError("the QUIC server did not start")
            relay = Relay.start(("127.0.0.1", hello["port"]), forward=forward, backward=backward)
            client = subprocess.Popen([sys.executable, me, "--role", "client", "--cert", cert,
                                       "--host", relay.address[0], "--port", str(relay.address[1]),
                                       "--seed", str(seed)] + common,
                                      stdout=subprocess.PIPE, text=True, env=env)
            srv = _read_json(server, deadline)
            result = (srv or {}).get("result", {"ok": False, "received": 0, "seconds": None, "timeout": True})
            cli = _read_json(client, time.monotonic() + 5) if result.get("ok") else None
            out.update(ok=bool(result.get("ok")) and bool(cli) and bool(cli["answer"].get("ok")),
                       received=result.get("received"), seconds=result.get("seconds"),
                       rss_server_mb=result.get("rss_mb"), timed_out=bool(result.get("timeout")),
                       cpu_server_s=result.get("cpu_s"))
            if result.get("seconds"):
                out["goodput_MBps"] = nbytes / result["seconds"] / 1e6
            if cli:
                out.update(client_seconds=cli["client_seconds"], handshake_s=cli["handshake_s"],
                           rss_client_mb=cli["rss_mb"], cpu_client_s=cli["cpu_s"])
        finally:
            if relay is not None:
                st = relay.stop()
                if st:
                    out["relay"] = {d: {k: st[d][k] for k in ("datagrams_in", "dropped", "duplicated", "reordered",
                                                              "queue_drops")} for d in ("forward", "backward")}
                    out["relay"]["cpu_seconds"] = st["cpu_seconds"]
            for proc in (client, server):
                if proc is None:
                    continue
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
                proc.stdout.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    ap.add_argument("--cert", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    ap.add_argument("--xxh3", help=argparse.SUPPRESS)
    ap.add_argument("--host", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--nbytes", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--mib", type=float, default=64.0, help="MiB per transfer (default 64)")
    ap.add_argument("--loss", default="0,0.01,0.05,0.2", help="comma-separated loss rates, both directions")
    ap.add_argument("--burst", type=float, default=1.0, help="mean loss burst length (1 = independent)")
    ap.add_argument("--delay", type=float, default=0.0, help="one-way delay, seconds, both directions")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per transfer")
    ap.add_argument("--cc", default="reno", choices=["reno", "cubic"], help="aioquic congestion control")
    ap.add_argument("--datagram-size", type=int, default=1200, help="aioquic max_datagram_size")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.role == "server":
        asyncio.run(_serve(args))
        return
    if args.role == "client":
        asyncio.run(_send(args))
        return
    nbytes = int(args.mib * (1 << 20)) & ~1
    rows = []
    print(f"QUIC (aioquic, {args.cc}, {args.datagram_size}-byte datagrams) one stream of {nbytes / (1 << 20):g} MiB, "
          f"through resonant.relay; loss both ways (burst {args.burst:g}), delay {args.delay * 1e3:g} ms each way")
    print(f"{'loss':>6} {'ok':>5} {'seconds':>9} {'MB/s':>8} {'handshake':>10} {'RSS cli/srv MiB':>16} "
          f"{'fwd drops':>10} {'bwd drops':>10} {'CPU s cli/srv/relay':>20}")
    for i, loss in enumerate(float(x) for x in args.loss.split(",")):
        fwd = Impairment(loss=loss, burst=args.burst, delay=args.delay, seed=2 * i + 1)
        bwd = Impairment(loss=loss, burst=args.burst, delay=args.delay, seed=2 * i + 2)
        row = quic_transfer(nbytes, fwd, bwd, args.timeout, cc=args.cc, datagram_size=args.datagram_size)
        row["loss"] = loss
        rows.append(row)
        rel = row.get("relay", {})
        secs = f"{row['seconds']:.2f}" if row.get("seconds") else f">{args.timeout:g}"
        rate = f"{row['goodput_MBps']:.1f}" if row.get("goodput_MBps") else \
            f"({(row.get('received') or 0) / (1 << 20):.1f} MiB)"
        hs = f"{row['handshake_s'] * 1e3:.0f} ms" if row.get("handshake_s") is not None else "-"
        rss = f"{row.get('rss_client_mb') or 0:.0f}/{row.get('rss_server_mb') or 0:.0f}"
        cpu = f"{row.get('cpu_client_s') or 0:.1f}/{row.get('cpu_server_s') or 0:.1f}/{rel.get('cpu_seconds', 0):.1f}"
        print(f"{loss * 100:>5g}% {str(row['ok']):>5} {secs:>9} {rate:>8} {hs:>10} {rss:>16} "
              f"{rel.get('forward', {}).get('dropped', '-'):>10} {rel.get('backward', {}).get('dropped', '-'):>10} "
              f"{cpu:>20}", flush=True)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
