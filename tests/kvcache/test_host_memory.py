import torch

from kvcache.host_memory import HostMemory


def test_one_physical_page_mapped_twice_aliases():
    memory = HostMemory()
    page = memory.granularity_bytes
    try:
        base = memory.reserve(4 * page)
        memory.create_pool(2, page)
        memory.map(base, [1])
        memory.map(base + 2 * page, [1])
        view = memory.as_tensor(base, 4 * page)
        view[:page] = 7
        assert torch.all(view[2 * page : 3 * page] == 7)
        memory.unmap(base, 1)
        memory.map(base + page, [0, 1])  # a run of two pages, one of them already mapped elsewhere
        assert torch.all(view[2 * page : 3 * page] == 7)
        view[page : 2 * page] = 3
        assert torch.all(view[2 * page : 3 * page] == 7)
    finally:
        memory.close()


def test_unmapped_range_is_inaccessible_again():
    memory = HostMemory()
    page = memory.granularity_bytes
    try:
        base = memory.reserve(2 * page)
        memory.create_pool(1, page)
        memory.map(base, [0])
        memory.unmap(base, 1)
        with open("/proc/self/maps") as f:
            line = next(ln for ln in f if int(ln.split("-")[0], 16) <= base < int(ln.split()[0].split("-")[1], 16))
        assert line.split()[1].startswith("---p")  # reserved, PROT_NONE, private: no physical page behind it
    finally:
        memory.close()


def _protection(address: int) -> str:
    with open("/proc/self/maps") as f:
        line = next(ln for ln in f if int(ln.split("-")[0], 16) <= address < int(ln.split()[0].split("-")[1], 16))
    return line.split()[1]


def test_a_map_that_fails_part_way_leaves_nothing_mapped(monkeypatch):
    """A page must never end up both mapped and back in the free list: a failure in a later run of pages unmaps the
    runs the same call had mapped, and the cache gives none of them back while mapped."""
    import kvcache.host_memory as host
    from kvcache import KVCacheConfig, PhysicalMemoryError, VirtualKVCache

    memory = HostMemory()
    page = memory.granularity_bytes
    try:
        base = memory.reserve(4 * page)
        memory.create_pool(4, page)
        real, calls = host._mmap_call, []

        def fail_second_run(address, size, prot, flags, fd, offset):
            if prot and calls.append(1) is None and len(calls) == 2:
                raise PhysicalMemoryError("injected")
            return real(address, size, prot, flags, fd, offset)

        monkeypatch.setattr(host, "_mmap_call", fail_second_run)
        try:
            memory.map(base, [0, 2])  # two runs: the second one fails
        except PhysicalMemoryError:
            pass
        monkeypatch.setattr(host, "_mmap_call", real)
        assert _protection(base).startswith("---p") and _protection(base + page).startswith("---p")
    finally:
        memory.close()

    cache = VirtualKVCache(
        KVCacheConfig(
            num_layers=2,
            num_kv_heads=2,
            head_dim=64,
            max_batch_size=2,
            max_seq_len=1024,
            kv_cache_memory_bytes=16 * page,
        )
    )
    try:
        before = cache.stats()
        monkeypatch.setattr(host, "_mmap_call", lambda *a: (_ for _ in ()).throw(PhysicalMemoryError("injected")))
        try:
            cache.allocate(200)
        except PhysicalMemoryError:
            pass
        monkeypatch.setattr(host, "_mmap_call", real)
        assert cache.stats() == before
        slot = cache.allocate(200)  # every page is usable again, and mapped once
        assert len({p for buf in cache.slot_page_ids(slot) for p in buf}) == 2 * cache.num_buffers
    finally:
        cache.close()
