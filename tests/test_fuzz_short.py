"""The fuzz targets (fuzz/, docs/fuzzing.md), each run briefly: CI's short version of `make fuzz`.

Each target runs for FUZZ_SECONDS in a subprocess, from its seed corpus, under a memory limit;
a finding (an exception that is not a ResonantError — for the Session target any exception —,
a crash, a timeout, or the process over -rss_limit_mb) makes libFuzzer exit non-zero and write
the input to crash-*/oom-*/timeout-* in the target's directory, which the failure message
names (reproduce with `fuzz/run.sh TARGET 0 FILE`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["decode", "codec", "handshake", "reassembler", "session"]
FUZZ_SECONDS = int(os.environ.get("RESONANT_FUZZ_SECONDS", "15"))

try:
    import atheris  # noqa: F401
except ImportError:  # pragma: no cover - the test extra installs it
    atheris = None


@pytest.mark.slow
@pytest.mark.pure_skip  # ~100 s of fuzzing: the RESONANT_PURE run leaves it to the fast run and `make fuzz`
@pytest.mark.skipif(atheris is None, reason="atheris is not importable (pip install '.[test]' or '.[fuzz]' installs it)")
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_finds_nothing(target, tmp_path):
    env = dict(os.environ, RESONANT_FUZZ_DIR=str(tmp_path))
    cmd = [sys.executable, str(ROOT / "fuzz" / f"fuzz_{target}.py"), f"-max_total_time={FUZZ_SECONDS}",
           "-rss_limit_mb=2048", "-timeout=20", "-print_final_stats=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=FUZZ_SECONDS + 120)
    # slow-unit-* is libFuzzer's note of an input slower than -report_slow_units (10 s), written
    # when this shared machine is loaded; a crash, an oom or a -timeout (20 s) is a finding.
    artifacts = sorted(p.name for p in (tmp_path / target).iterdir()
                       if p.is_file() and not p.name.startswith("slow-unit-"))
    tail = "\n".join(proc.stderr.splitlines()[-60:])
    assert proc.returncode == 0 and not artifacts, (
        f"fuzz target {target}: exit {proc.returncode}, artifacts {artifacts} in {tmp_path / target}\n{tail}")
    runs = [ln for ln in proc.stderr.splitlines() if ln.startswith("stat::number_of_executed_units")]
    assert runs and int(runs[0].split(":")[-1]) > 100, tail  # it did fuzz
