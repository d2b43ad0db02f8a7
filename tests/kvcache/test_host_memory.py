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
