"""Process B of the two-process examples (split_inference.py, kv_handoff.py, split_generate.py):
the example's own script started again with `--role ROLE`, answering in JSON lines on its stdout
(a line with "error" is a failure), reading control lines on its stdin, and exiting when its
stdin closes."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time


class VerificationError(RuntimeError):
    """What an example checks did not hold (the example exits 1 with it)."""


class ProcessB:
    def __init__(self, script: str, role: str, *args: str, timeout: float, stop_timeout: float = 15.0) -> None:
        self.argv = [sys.executable, os.path.abspath(script), "--role", role, *args]
        self.timeout = timeout
        self.stop_timeout = stop_timeout
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(*self.argv, stdin=asyncio.subprocess.PIPE,
                                                         stdout=asyncio.subprocess.PIPE, limit=1 << 24)

    async def order(self, doc: dict) -> None:
        """One control line to B's stdin."""
        self.proc.stdin.write((json.dumps(doc) + "\n").encode())
        await self.proc.stdin.drain()

    async def line(self, timeout: float | None = None) -> dict:
        """B's next JSON line (VerificationError when B ended or reported an error)."""
        raw = await asyncio.wait_for(self.proc.stdout.readline(), self.timeout if timeout is None else timeout)
        if not raw:
            raise VerificationError(f"process B ended (exit status {await self.proc.wait()})")
        doc = json.loads(raw)
        if "error" in doc:
            raise VerificationError(f"process B: {doc['error']}")
        return doc

    async def stop(self) -> int:
        """Close B's stdin (its signal to exit) and wait; kill it only if it does not go."""
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else 0
        try:
            self.proc.stdin.close()
            return await asyncio.wait_for(self.proc.wait(), self.stop_timeout)
        except (asyncio.TimeoutError, BrokenPipeError, ConnectionResetError):
            self.proc.kill()
            await self.proc.wait()
            return -9


async def run_beside(b: ProcessB, work, t_start: float) -> tuple[dict, int]:
    """Start B (it loads while A does), run work(b) -> result, stop B: (result with "ok" and
    "elapsed_s", B's exit status; a non-zero one is a failure)."""
    await b.start()
    try:
        result = await work(b)
    except BaseException:
        await b.stop()
        raise
    rc = await b.stop()
    if rc != 0:
        result["failures"].append(f"process B exited with status {rc}")
    result["ok"] = not result["failures"]
    result["elapsed_s"] = round(time.monotonic() - t_start, 2)
    return result, rc


def report(result: dict, as_json: bool, print_table) -> int:
    """The result as JSON on stdout, or as the example's table with what failed and OK / FAILED; the
    exit status (0: every check held)."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
        for f in result["failures"]:
            print("FAIL:", f)
        print("OK" if result["ok"] else "FAILED")
    return 0 if result["ok"] else 1


def run_a(main) -> int:
    """Process A's run of the coroutine `main`: its exit status, or 1 with FAILED and the reason on
    stderr when it raised VerificationError (B misbehaved, or an event was not what it should be)."""
    try:
        return asyncio.run(main)
    except VerificationError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------ B's side


def stdin_closed() -> asyncio.Event:
    """B: an event set when A closes B's stdin (or dies): time to go. Call in B's event loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def watch() -> None:
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch, daemon=True).start()
    return stop


def say(doc: dict) -> None:
    """B: one JSON line to A."""
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()
