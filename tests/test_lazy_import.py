"""`import resonant` stays light: ml_dtypes (which takes longer to import than the rest of the
package) is imported only when a bfloat16 is first needed, and bfloat16 then works everywhere as
before, whichever of resonant and ml_dtypes the program imports first. Each case runs in a fresh
interpreter (with the fast paths as the environment says, RESONANT_PURE included)."""

from __future__ import annotations

import subprocess
import sys
import textwrap



def run(code: str) -> str:
    # (conftest puts the resonant under test first on PYTHONPATH: this tree, or the installed package)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_import_resonant_does_not_import_ml_dtypes():
    out = run("""
        import sys
        import resonant, resonant.cli, resonant.quant, resonant.critique, resonant.inspect
        parser = resonant.cli.build_parser()
        print("ml_dtypes" in sys.modules)
    """)
    assert out == "False"


def test_bf16_decodes_to_bfloat16_without_the_caller_importing_ml_dtypes():
    out = run("""
        import sys
        import numpy as np, resonant
        from resonant import DType, Slice
        bits = np.array([0x3F80, 0xC000, 0x0000, 0x7F80], np.uint16)  # 1, -2, 0, inf
        frame = resonant.Think(Slice(DType.BF16, (4,), bits.tobytes()), stream_id=1)
        arr = resonant.decode(resonant.encode(frame)).slices[0].numpy()
        print(arr.dtype.name, arr.astype(np.float32).tolist(), "ml_dtypes" in sys.modules)
    """)
    assert out == "bfloat16 [1.0, -2.0, 0.0, inf] True"


def test_bf16_arrays_encode_when_ml_dtypes_is_imported_after_resonant():
    out = run("""
        import numpy as np, resonant
        from resonant.stream_sender import StreamSender
        import ml_dtypes
        x = np.linspace(-2, 2, 24, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 12)
        frame = resonant.Think(x, stream_id=1)
        back = resonant.decode(resonant.encode(frame)).slices[0]
        assert back.dtype == resonant.DType.BF16 and np.array_equal(back.numpy().view(np.uint16), x.view(np.uint16))
        s = resonant.Slice.from_array(x)
        assert s.dtype == resonant.DType.BF16 and s.shape == (2, 12)
        assert resonant.Slice.from_array(np.ones(3, np.float32), dtype=resonant.DType.BF16).numpy().dtype == x.dtype
        print("ok")
    """)
    assert out == "ok"


def test_bf16_stream_round_trip_in_a_fresh_interpreter():
    out = run("""
        import numpy as np, resonant
        from resonant import Session
        c, s = Session(role="client"), Session(role="server")
        c.initiate(0.0)
        for d in c.datagrams_to_send():
            s.receive_datagram(d, 0.0)
        for d in s.datagrams_to_send():
            c.receive_datagram(d, 0.0)
        import ml_dtypes
        x = (np.arange(40000, dtype=np.float32) / 7).astype(ml_dtypes.bfloat16)
        events = [e for f in c.stream(c.new_stream_id(), [x]) for e in s.receive_datagram(bytes(f), 0.0)]
        done = [e for e in events if isinstance(e, resonant.StreamComplete)]
        got = done[0].objects[0]
        print(got.dtype.name, np.array_equal(got.view(np.uint16), x.view(np.uint16)))
    """)
    assert out == "bfloat16 True"


def test_import_resonant_leaves_asyncio_out_until_the_adapters_are_used():
    out = run("""
        import sys
        import resonant
        before = "resonant.aio" in sys.modules or "asyncio" in sys.modules
        from resonant import connect
        assert connect is resonant.connect is resonant.aio.connect and resonant.Peer is resonant.aio.Peer
        assert {"connect", "serve", "Peer", "Server", "aio"} <= set(dir(resonant))
        try:
            resonant.no_such_name
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        print(before)
    """)
    assert out == "False"


def test_quant_names_bf16_whether_ml_dtypes_came_first_or_not():
    for first in ("import ml_dtypes", "pass"):
        out = run(f"""
            {first}
            import resonant.quant as q
            print(sorted(q._NAMES))
        """)
        assert "'bf16'" in out and "'f16'" in out and "'q4_0'" in out and "'i8'" not in out, (first, out)
