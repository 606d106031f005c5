"""Two peers on loopback with the asyncio API: a server and a client in one script.

    python examples/peers.py [tcp|udp]
"""

import asyncio
import sys

import numpy as np

import resonant


async def main(scheme: str) -> None:
    async with resonant.serve(f"{scheme}://127.0.0.1:0") as server:
        url = f"{scheme}://127.0.0.1:{server.address[1]}"
        async with resonant.connect(url, compress=("zstd", "none")) as peer:
            print("agreed:", peer.agreement)
            await peer.send(resonant.Think(np.ones((1, 2048), np.float16), stream_id=1))
            kv = [np.random.default_rng(i).standard_normal((8, 256, 64)).astype(np.float16) for i in range(4)]
            await peer.send_stream(kv, names=["l0.k", "l0.v", "l1.k", "l1.v"], layers=[0, 0, 1, 1])
            async for address, event in server:
                print(address, type(event).__name__, getattr(event, "frame", "") or "")
                if isinstance(event, resonant.StreamComplete):
                    assert all(np.array_equal(a, b) for a, b in zip(event.objects, kv))
                    print("stream verified, xxh3_64", f"{event.xxh3_64:016x}")
                    break


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "tcp"))
