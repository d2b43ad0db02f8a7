"""Whether mapping pages from several host threads is faster than from one (CUDA VMM), and which driver call
costs: 16,384 mappings of 2 MiB pages (16 aliases of a 1,024-page pool, 128 pages a call, as prefix hits map them)
from 1-16 threads, with the GPU idle and busy; then ``cuMemMap`` alone against ``cuMemSetAccess`` alone.

    python benchmarks/probe_map_threads.py      # on a GPU; benchmarks/results/map_threads_h100.log

On the H100 (16-core host): 32.7 us a page from one thread, 41-47 us from 2-16 (the driver serializes them);
``cuMemMap`` 1.8 us a page, ``cuMemSetAccess`` 25.4 us a page even over 128-page runs.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kvcache import make_physical_memory  # noqa: E402

POOL = 1024
RUN = 128  # pages per map call (one prefix of 2K tokens)
ALIASES = 16  # addresses each pool page is mapped at (prefix hits)


def main() -> None:
    memory = make_physical_memory("cuda")
    page = memory.granularity_bytes
    memory.create_pool(POOL, page)
    base = memory.reserve(POOL * ALIASES * page)
    cu = memory._cu
    # A busy GPU, as in serving: a stream of matmuls while mapping.
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def busy():
        for _ in range(200):
            a @ a

    def job(k: int, alias: int) -> None:
        first = (k * RUN) % POOL
        memory.map(base + (alias * POOL + first) * page, list(range(first, first + RUN)))

    jobs = [(k, alias) for alias in range(ALIASES) for k in range(POOL // RUN)]
    print(f"{len(jobs)} map calls of {RUN} pages ({len(jobs) * RUN} pages), page {page >> 20} MiB")
    for gpu_busy in (False, True):
        for threads in (1, 2, 4, 8, 16):
            if gpu_busy:
                busy()
            t = time.perf_counter()
            if threads == 1:
                for j in jobs:
                    job(*j)
            else:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(lambda j: job(*j), jobs))
            s = time.perf_counter() - t
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            memory.unmap(base, POOL * ALIASES)
            u = time.perf_counter() - t2
            print(
                f"busy={gpu_busy!s:5} threads={threads:2}: map {s * 1e6 / (len(jobs) * RUN):6.1f} us/page "
                f"({s:.3f} s), unmap {u * 1e6 / (len(jobs) * RUN):5.1f} us/page"
            )
    # map alone vs access alone, one thread
    t = time.perf_counter()
    for k in range(POOL):
        cu.cuMemMap(base + k * page, page, 0, memory._handles[k], 0)
    m = time.perf_counter() - t
    t = time.perf_counter()
    for k in range(0, POOL, RUN):
        cu.cuMemSetAccess(base + k * page, RUN * page, memory._access, 1)
    acc = time.perf_counter() - t
    print(
        f"cuMemMap alone {m * 1e6 / POOL:.1f} us/page, cuMemSetAccess per {RUN}-page run {acc * 1e6 / POOL:.1f} us/page"
    )
    cu.cuMemUnmap(base, POOL * page)
    memory.close()


if __name__ == "__main__":
    main()
