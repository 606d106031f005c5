"""The `resonant` command with a 256 MiB array: start-up, file load, transfer and save, each
measured on its own, against the asyncio API (`resonant.serve` / `peer.send_stream`) and a raw
socket moving the same bytes in the same run.

Not part of the test suite. Run from the repository root:

    python3 bench/bench_cli.py [--mib 256] [--rounds 3] [--tree DIR ...] [--udp] [--json PATH|-]

Every row runs in fresh processes over 127.0.0.1 (TCP; UDP too with --udp), receiver and sender
apart, on a float16 .npy array of --mib MiB (random bits, so that nothing compresses it):

- start-up: the wall time of `python -c "import resonant"` and of `resonant --version` (or
  `--help` where --version does not exist), and of `python -c pass` for scale.
- resonant CLI: `resonant recv --listen URL --json --count 1 --save DIR` and `resonant send --to
  URL FILE.npy`, run through their own main() in a wrapper that only takes times: file load
  (the sender's _load), transfer (on the receiver: from its stream_started line to its
  stream_complete line, which it prints once the last byte is in and the stream's xxh3_64
  verified, minus the save in between) and save (the receiver's _save: the .npy file written).
  Also "send_stream call -> verified": from the sender's call of peer.send_stream to the
  receiver's stream_complete (one clock: perf_counter is system-wide on Linux), which does not
  depend on when the receiver's event loop gets round to the StreamStarted event.
- resonant asyncio: a receiver with `resonant.serve(URL)` taking the time at StreamStarted and at
  StreamComplete (the same two points), the sender `resonant.connect(URL)` and
  `await peer.send_stream([array])` of the array loaded before.
- raw socket (TCP): the sender sendall()s the array's bytes, the receiver recv_into()s them into a
  buffer it allocated before; first byte to last byte.

With several --tree DIRs (checkouts built in place, e.g. a "before" worktree and this one), each
round runs every tree's rows, alternating the order, so a noisy spell of this shared machine hits
them alike. Each figure is the median over the rounds with its min and max; the ratios are of
medians: CLI transfer / asyncio transfer (the target: CLI rate >= 0.8x asyncio, i.e. transfer
time ratio <= 1.25), and each against the raw socket.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
TIMEOUT_S = 300

# The CLI under timing: its own main(), with its load, save and printing wrapped to take times.
CLI_WRAPPER = r"""
import json, sys, time
from resonant import cli
T = {}
def wrap(name):
    f = getattr(cli, name, None)
    if f is None:
        return
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            T[name] = T.get(name, 0.0) + time.perf_counter() - t
    setattr(cli, name, timed)
wrap("_load"); wrap("_save")
def stamped_print(*a, **k):
    text = " ".join(map(str, a))
    for ev in ("stream_started", "stream_complete"):
        if ev in text and ev not in T:
            T[ev] = time.perf_counter()
    return print(*a, **k)
cli.print = stamped_print
import resonant.aio
_send_stream = resonant.aio.Peer.send_stream
async def send_stream(self, *a, **k):
    T.setdefault("send_stream_start", time.perf_counter())
    return await _send_stream(self, *a, **k)
resonant.aio.Peer.send_stream = send_stream
try:
    rc = cli.main(sys.argv[1:])
finally:
    print("BENCH " + json.dumps(T), file=sys.stderr, flush=True)
sys.exit(rc)
"""

AIO_RECV = r"""
import asyncio, json, sys, time
import resonant
async def main():
    t = {}
    async with resonant.serve(sys.argv[1]) as server:
        print(f"listening on {server.address[1]}", file=sys.stderr, flush=True)
        async for addr, ev in server:
            if isinstance(ev, resonant.StreamStarted):
                t["stream_started"] = time.perf_counter()
            elif isinstance(ev, resonant.StreamComplete):
                t["stream_complete"] = time.perf_counter()
                t["nbytes"] = ev.nbytes
                break
            elif isinstance(ev, resonant.StreamFailed):
                t["failed"] = ev.reason
                break
    print("BENCH " + json.dumps(t), file=sys.stderr, flush=True)
asyncio.run(main())
"""

AIO_SEND = r"""
import asyncio, json, sys, time
import numpy as np
import resonant
async def main():
    t = time.perf_counter()
    arr = np.load(sys.argv[2], allow_pickle=False)
    load = time.perf_counter() - t
    async with resonant.connect(sys.argv[1]) as peer:
        t = time.perf_counter()
        await peer.send_stream([arr])
        print("BENCH " + json.dumps({"_load": load, "send": time.perf_counter() - t, "send_stream_start": t}),
              file=sys.stderr, flush=True)
        await asyncio.sleep(0.05)
asyncio.run(main())
"""

RAW_RECV = r"""
import json, socket, sys, time
n = int(sys.argv[1])
buf = bytearray(n)
view = memoryview(buf)
ls = socket.create_server(("127.0.0.1", 0))
print(f"listening on {ls.getsockname()[1]}", file=sys.stderr, flush=True)
conn, _ = ls.accept()
conn.settimeout(120)
got = conn.recv_into(view)
t0 = time.perf_counter()
while got < n:
    k = conn.recv_into(view[got:])
    if not k:
        break
    got += k
t1 = time.perf_counter()
print("BENCH " + json.dumps({"stream_started": t0, "stream_complete": t1, "nbytes": got}), file=sys.stderr, flush=True)
"""

RAW_SEND = r"""
import socket, sys
import numpy as np
arr = np.load(sys.argv[2], allow_pickle=False)
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(memoryview(arr.reshape(-1).view(np.uint8)))
s.close()
"""


class Child:
    """A child process whose stdout and stderr lines are read by threads."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, env=env, cwd=WORKDIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.listening = threading.Event()
        self.port: int | None = None
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()

    def _read(self, stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            if line.startswith("listening on") and self.port is None:
                self.port = int(line.rsplit(":", 1)[-1].split()[-1])
                self.listening.set()

    def wait(self) -> int:
        try:
            return self.proc.wait(TIMEOUT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def bench(self) -> dict:
        for line in self.err:
            if line.startswith("BENCH "):
                return json.loads(line[6:])
        raise RuntimeError("no timings from child:\n" + "".join(self.err[-20:]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# Children run in the bench's own temporary directory, not in the current directory: `python -c`
# puts the current directory first on sys.path, where a checkout would shadow the tree under test.
WORKDIR = tempfile.gettempdir()


def env_for(tree: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree or ROOT)
    return env


def _pair(recv_argv: list[str], send_argv_of, env: dict[str, str]) -> tuple[dict, dict, float]:
    """Start the receiver, then the sender once it listens; both timings and the wall time."""
    t = time.perf_counter()
    r = Child(recv_argv, env)
    s = None
    try:
        if not r.listening.wait(60):
            raise RuntimeError("receiver did not listen:\n" + "".join(r.err[-20:]))
        t_send = time.perf_counter()
        s = Child(send_argv_of(r.port), env)
        src = s.wait()
        send_wall = time.perf_counter() - t_send
        rrc = r.wait()
        if src or rrc:
            raise RuntimeError(f"sender exit {src}, receiver exit {rrc}:\n" + "".join(s.err[-10:] + r.err[-10:]))
        st = s.bench() if any(x.startswith("BENCH ") for x in s.err) else {}
        st["send_wall"] = send_wall
        return r.bench(), st, time.perf_counter() - t
    finally:
        r.kill()
        if s is not None:
            s.kill()


def run_cli(tree, scheme: str, path: Path, save_dir: Path, mib: int) -> dict:
    py = sys.executable
    shutil.rmtree(save_dir, ignore_errors=True)
    rt, st, wall = _pair(
        [py, "-c", CLI_WRAPPER, "recv", "--listen", f"{scheme}://{HOST}:0", "--json", "--count", "1",
         "--save", str(save_dir), "--max-bytes", str(4 * mib << 20)],
        lambda port: [py, "-c", CLI_WRAPPER, "send", "--to", f"{scheme}://{HOST}:{port}", str(path)], env_for(tree))
    saved = list(save_dir.glob("*.npy"))
    if len(saved) != 1:
        raise RuntimeError(f"expected one saved .npy, found {saved}")
    save = rt.get("_save", 0.0)
    return {"load": st.get("_load"), "transfer": rt["stream_complete"] - rt["stream_started"] - save,
            "end_to_end": rt["stream_complete"] - st["send_stream_start"] - save, "save": save, "send_wall": st["send_wall"], "wall": wall}


def run_aio(tree, scheme: str, path: Path) -> dict:
    py = sys.executable
    rt, st, wall = _pair([py, "-c", AIO_RECV, f"{scheme}://{HOST}:0"],
                         lambda port: [py, "-c", AIO_SEND, f"{scheme}://{HOST}:{port}", str(path)], env_for(tree))
    if "failed" in rt:
        raise RuntimeError(f"asyncio stream failed: {rt['failed']}")
    return {"load": st.get("_load"), "transfer": rt["stream_complete"] - rt["stream_started"],
            "end_to_end": rt["stream_complete"] - st["send_stream_start"], "send_wall": st["send_wall"], "wall": wall}


def run_raw(path: Path, nbytes: int) -> dict:
    py = sys.executable
    rt, _, wall = _pair([py, "-c", RAW_RECV, str(nbytes)], lambda port: [py, "-c", RAW_SEND, str(port), str(path)],
                        env_for(None))
    if rt["nbytes"] != nbytes:
        raise RuntimeError(f"raw socket: {rt['nbytes']} of {nbytes} bytes")
    return {"transfer": rt["stream_complete"] - rt["stream_started"], "wall": wall}


def startup(tree, repeat: int) -> dict:
    py = sys.executable
    env = env_for(tree)
    main = "import sys; from resonant.cli import main; sys.exit(main(sys.argv[1:]))"
    where = subprocess.run([py, "-c", "import resonant; print(resonant.__file__)"], env=env, cwd=WORKDIR,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(Path(env["PYTHONPATH"]).resolve()):
        raise SystemExit(f"bench_cli: the children import {where}, not the tree {env['PYTHONPATH']}")
    version = subprocess.run([py, "-c", main, "--version"], env=env, cwd=WORKDIR, capture_output=True).returncode == 0
    cmds = {"python -c pass": [py, "-c", "pass"], "import resonant": [py, "-c", "import resonant"],
            "resonant --version" if version else "resonant --help": [py, "-c", main, "--version" if version else "--help"]}
    out: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(repeat):
        for name, argv in cmds.items():
            t = time.perf_counter()
            subprocess.run(argv, env=env, cwd=WORKDIR, capture_output=True, check=True)
            out[name].append(time.perf_counter() - t)
    # The import itself, as python -X importtime counts it (without the interpreter's own start-up).
    imp = []
    for _ in range(repeat):
        p = subprocess.run([py, "-X", "importtime", "-c", "import resonant"], env=env, cwd=WORKDIR, capture_output=True,
                           text=True)
        last = [ln for ln in p.stderr.splitlines() if ln.rstrip().endswith("| resonant")]
        imp.append(int(last[-1].split("|")[1]) / 1e6)
    out["import resonant (importtime)"] = imp
    return out


def stats(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else {}


def fmt(st: dict) -> str:
    if not st:
        return "n/a"
    return f"{st['median']:8.3f} s  [{st['min']:.3f} .. {st['max']:.3f}]"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256, help="array size in MiB (default 256)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--startup-repeat", type=int, default=5, help="start-up runs per command and round (default 5)")
    p.add_argument("--tree", action="append", metavar="DIR",
                   help="a checkout built in place to run (PYTHONPATH); repeat to compare (default: this one)")
    p.add_argument("--udp", action="store_true", help="UDP rows too")
    p.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON ('-' for stdout)")
    args = p.parse_args()
    trees = args.tree or [str(ROOT)]
    labels = {t: Path(t).resolve().name for t in trees}
    out = sys.stderr if args.json == "-" else sys.stdout
    schemes = ["tcp"] + (["udp"] if args.udp else [])
    nbytes = args.mib << 20
    global WORKDIR
    tmp = Path(tempfile.mkdtemp(prefix="bench_cli_"))
    WORKDIR = str(tmp)
    try:
        path = tmp / "array.npy"
        rng = np.random.default_rng(20261204)
        np.save(path, rng.integers(0, 1 << 16, nbytes // 2, dtype=np.uint16).view(np.float16).reshape(-1, 4096))
        del rng
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python "
              f"{platform.python_version()}; array: float16 {nbytes:,} bytes ({args.mib} MiB) in {path.stat().st_size:,}"
              f" bytes of .npy; {args.rounds} rounds", file=out)
        res: dict = {t: {"startup": {}, **{s: {"cli": [], "aio": []} for s in schemes}} for t in trees}
        raw: list[dict] = []
        for rnd in range(args.rounds):
            order = trees if rnd % 2 == 0 else trees[::-1]
            for t in order:
                for name, xs in startup(t, args.startup_repeat).items():
                    res[t]["startup"].setdefault(name, []).extend(xs)
            for scheme in schemes:
                jobs = [(t, kind) for t in order for kind in (("cli", "aio") if rnd % 2 == 0 else ("aio", "cli"))]
                if scheme == "tcp":
                    jobs.insert(len(jobs) // 2, (None, "raw"))
                for t, kind in jobs:
                    try:
                        if kind == "raw":
                            raw.append(run_raw(path, nbytes))
                        elif kind == "cli":
                            res[t][scheme]["cli"].append(run_cli(t, scheme, path, tmp / "saved", args.mib))
                        else:
                            res[t][scheme]["aio"].append(run_aio(t, scheme, path))
                    except RuntimeError as exc:
                        print(f"round {rnd + 1} {labels.get(t, 'raw')} {scheme} {kind}: FAILED {exc}", file=sys.stderr)
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
        raw_st = stats([r["transfer"] for r in raw])
        doc: dict = {"bytes": nbytes, "rounds": args.rounds, "raw_tcp": {"transfer": raw_st, "runs": raw}, "trees": {}}
        print(f"\nraw socket (TCP) transfer: {fmt(raw_st)}" + (f"  {nbytes / raw_st['median'] / 1e6:,.0f} MB/s"
                                                             if raw_st else ""), file=out)
        for t in trees:
            print(f"\n== {labels[t]} ({t})", file=out)
            print(f"{'start-up (wall, incl. interpreter)':<44} {'median':>8}    [min .. max]", file=out)
            tdoc: dict = {"startup": {}}
            for name, xs in res[t]["startup"].items():
                st = stats(xs)
                tdoc["startup"][name] = st
                print(f"  {name:<42} {fmt(st)}", file=out)
            for scheme in schemes:
                cli, aio = res[t][scheme]["cli"], res[t][scheme]["aio"]
                c = {k: stats([r.get(k) for r in cli]) for k in ("load", "transfer", "end_to_end", "save", "send_wall", "wall")}
                a = {k: stats([r.get(k) for r in aio]) for k in ("load", "transfer", "end_to_end", "send_wall", "wall")}
                tdoc[scheme] = {"cli": c, "aio": a, "cli_runs": cli, "aio_runs": aio}
                print(f"{scheme.upper() + ' phase':<44} {'median':>8}    [min .. max]", file=out)
                print(f"  {'CLI file load (send: _load)':<42} {fmt(c['load'])}", file=out)
                print(f"  {'CLI transfer (first byte -> verified)':<42} {fmt(c['transfer'])}"
                      + (f"  {nbytes / c['transfer']['median'] / 1e6:,.0f} MB/s" if c["transfer"] else ""), file=out)
                print(f"  {'CLI send_stream call -> verified':<42} {fmt(c['end_to_end'])}", file=out)
                print(f"  {'CLI save (recv --save: .npy written)':<42} {fmt(c['save'])}", file=out)
                print(f"  {'CLI `resonant send` process (wall)':<42} {fmt(c['send_wall'])}", file=out)
                print(f"  {'CLI whole run (both processes, wall)':<42} {fmt(c['wall'])}", file=out)
                print(f"  {'asyncio API load (np.load)':<42} {fmt(a['load'])}", file=out)
                print(f"  {'asyncio API transfer (send_stream)':<42} {fmt(a['transfer'])}"
                      + (f"  {nbytes / a['transfer']['median'] / 1e6:,.0f} MB/s" if a["transfer"] else ""), file=out)
                print(f"  {'asyncio API send_stream call -> verified':<42} {fmt(a['end_to_end'])}", file=out)
                print(f"  {'asyncio API sender process (wall)':<42} {fmt(a['send_wall'])}", file=out)
                ratios = {}
                if c["transfer"] and a["transfer"]:
                    ratios["cli_rate_over_aio"] = a["transfer"]["median"] / c["transfer"]["median"]
                    ratios["cli_rate_over_aio_end_to_end"] = a["end_to_end"]["median"] / c["end_to_end"]["median"]
                    if raw_st and scheme == "tcp":
                        ratios["cli_rate_over_raw"] = raw_st["median"] / c["transfer"]["median"]
                        ratios["aio_rate_over_raw"] = raw_st["median"] / a["transfer"]["median"]
                    print("  rates: " + ", ".join(f"{k.replace('_rate_over_', ' / ')} {v:.2f}x"
                                                 for k, v in ratios.items())
                          + f"   (target CLI / aio >= 0.8x: {'ok' if ratios['cli_rate_over_aio'] >= 0.8 else 'MISSED'})",
                          file=out)
                tdoc[scheme]["ratios"] = ratios
            doc["trees"][t] = tdoc
        if args.json:
            text = json.dumps(doc, indent=2)
            if args.json == "-":
                print(text)
            else:
                Path(args.json).write_text(text + "\n")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
