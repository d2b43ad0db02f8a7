"""What makes an object a ``kvcache.KVCache``: every member of the protocol, methods with its parameters."""

from __future__ import annotations

import inspect

from kvcache import KVCache


def protocol_members() -> list[str]:
    """The protocol's members: its annotated attributes and its methods and properties."""
    names = set(KVCache.__annotations__)
    names |= {n for n, v in vars(KVCache).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    return sorted(names)


def check_implements_kv_cache(cache) -> None:
    """Asserts ``cache`` has every member of ``KVCache``, each method taking the protocol's parameters by name."""
    assert isinstance(cache, KVCache)
    for name in protocol_members():
        assert hasattr(cache, name), name
        wanted = vars(KVCache).get(name)  # None for an annotated attribute
        if callable(wanted):
            expected = list(inspect.signature(wanted).parameters)[1:]
            got = list(inspect.signature(getattr(cache, name)).parameters)
            assert got == expected, f"{type(cache).__name__}.{name}{got} != KVCache.{name}{expected}"
