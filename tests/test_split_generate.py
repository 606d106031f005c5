"""examples/split_generate.py end to end: SmolLM2-135M split over two real processes, greedy generation.

Runs the example as a subprocess (`--quick --json`: a ~40-token prompt, 8 new tokens, one repeat;
it starts its own tail process, which loads the model too) and checks its JSON. Both transports
are checked in the one run: B serves TCP and UDP from one process and one model load, so UDP
costs a few seconds of generation, not another load (~100 s in all on the 2-core box, most of it
the two model loads). Skipped without the model (make install-model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import _smollm2  # noqa: E402

# slow + pure_skip: two model loads; its frames take paths the rest of the suite covers
pytestmark = [pytest.mark.slow, pytest.mark.pure_skip,
              pytest.mark.skipif(not _smollm2.available(), reason="SmolLM2 not installed: " + _smollm2.INSTALL_HINT)]

EXAMPLE = ROOT / "examples" / "split_generate.py"
TIMEOUT = 900  # seconds; a run takes ~100 s on the 2-core box, more when other jobs load it


@pytest.fixture(scope="module")
def run() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--quick", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def test_generation_is_identical_on_both_transports(run):
    assert run["ok"] is True and run["failures"] == []
    assert run["transports"] == ["tcp", "udp"] and run["new_tokens"] == 8
    ref = run["reference"]["tokens"]
    assert len(ref) == 8
    for t in ("tcp", "udp"):
        r = run["runs"][t]
        assert r["identical"] is True and r["identical_tokens"] == 8, t
        assert r["tokens"] == ref, t
    assert run["text"]  # the tokens decode to some text


def test_split_in_one_process_is_exact(run):
    """Layers 0-14 then 15-29, each half with its own cache, compute what the whole model computes."""
    assert run["local_split"]["identical"] is True
    assert run["local_split"]["logits_max_abs_diff"] == 0.0
    assert run["checks"]["tail_exit_status"] == 0


def test_framing_and_bytes(run):
    n = run["prompt_tokens"]
    for t in ("tcp", "udp"):
        r = run["runs"][t]
        p = r["prefill"]
        # the prompt's residual: 1 x n x 576 float32, more than a frame: one V-Stream
        assert p["framing"] == "stream" and p["residual_bytes"] == n * 576 * 4 > 65536, t
        assert p["residual_bytes"] < p["wire_bytes"] < p["residual_bytes"] * 1.02, t
        # each further token: one Think frame, 2,304 bytes of float32 plus header and CRC
        (wire,) = r["wire_bytes_per_token"]
        assert 2304 < wire < 2304 + 128, t
        assert r["decode_steps"] == 7


def test_timings_are_consistent(run):
    assert run["reference"]["ms_per_token"] > 0 and run["local_split"]["ms_per_token"] > 0
    for t in ("tcp", "udp"):
        r = run["runs"][t]
        for key in ("ms_per_token", "head_ms", "tail_ms", "transfer_ms", "raw_floor_ms", "raw_in_step_ms"):
            assert r[key] > 0, (t, key)
        assert r["hop_ms"] > 0 and r["back_ms"] > 0, t
        assert r["ms_per_token"] > r["head_ms"] and r["ms_per_token"] > r["tail_ms"], t
        assert r["overhead_ms"] == pytest.approx(r["ms_per_token"] - run["reference"]["ms_per_token"], abs=2e-3)
        assert r["raw_floor_trips"] == 200
