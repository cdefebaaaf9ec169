"""What UCX peer error handling costs on this machine: one large ucxx tag message between two
processes, over (a) a listener endpoint with error handling on (what a control endpoint uses)
and (b) a worker-address endpoint with error handling off (what our data endpoints use).

    python3 -m nixl_connectors.tools.bench.ucx_error_handling [--mib 256] [--reps 5]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time

import numpy as np


def _sender(port_q, addr_q, nbytes: int, reps: int) -> None:
    import ucxx

    async def main() -> None:
        buf = np.ones(nbytes, np.uint8)
        done = asyncio.Event()

        async def handler(ep) -> None:
            hdr = np.empty(4096, np.uint8)
            await ep.recv(hdr)
            n = int(hdr[:8].view(np.int64)[0])
            data_ep = await ucxx.create_endpoint_from_worker_address(
                ucxx.get_ucx_address_from_buffer(hdr[8:8 + n].tobytes()), endpoint_error_handling=False)
            for mode in ("eh_on", "eh_off"):
                for i in range(reps + 1):
                    await ep.recv(np.empty(1, np.uint8))
                    if mode == "eh_on":
                        await ep.send(buf)
                    else:
                        await data_ep.send(buf, tag=1000 + i, force_tag=True)
            done.set()

        listener = ucxx.create_listener(handler, 0, endpoint_error_handling=True)
        port_q.put(listener.port)
        await asyncio.wait_for(done.wait(), 300)
        await asyncio.sleep(0.5)

    asyncio.run(main())


def measure(nbytes: int = 256 << 20, reps: int = 5, timeout_s: float = 300.0) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_sender, args=(q, None, nbytes, reps), daemon=True)
    proc.start()
    try:
        port = q.get(timeout=120)
        import ucxx

        async def main() -> dict:
            ep = await ucxx.create_endpoint("127.0.0.1", port, endpoint_error_handling=True)
            addr = ucxx.get_worker_address().tobytes()
            hdr = np.zeros(4096, np.uint8)
            hdr[:8].view(np.int64)[0] = len(addr)
            hdr[8:8 + len(addr)] = np.frombuffer(addr, np.uint8)
            await ep.send(hdr)
            buf = np.zeros(nbytes, np.uint8)
            out = {}
            for mode in ("eh_on", "eh_off"):
                best = float("inf")
                for i in range(reps + 1):
                    t0 = time.perf_counter()
                    await ep.send(np.ones(1, np.uint8))
                    if mode == "eh_on":
                        await asyncio.wait_for(ep.recv(buf), timeout_s)
                    else:
                        await asyncio.wait_for(ucxx.recv(buf, tag=1000 + i), timeout_s)
                    if i:
                        best = min(best, time.perf_counter() - t0)
                out[mode] = nbytes / best / 1e9
            return out

        return asyncio.run(main())
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    r = measure(a.mib << 20, a.reps)
    print(f"one {a.mib} MiB message: error handling on {r['eh_on']:.2f} GB/s, "
          f"off {r['eh_off']:.2f} GB/s ({r['eh_off'] / r['eh_on']:.1f}x)")


if __name__ == "__main__":
    main()
