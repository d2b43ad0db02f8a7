"""``free_port``: the ports servers and process groups start on."""

import random
import socket

import pytest

import engine.distributed as distributed
from engine.distributed import ephemeral_port_range, free_port


@pytest.mark.skipif(ephemeral_port_range()[0] < 21000, reason="no room below this host's ephemeral range")
def test_free_port_is_bindable_and_outside_the_ephemeral_range():
    low, _ = ephemeral_port_range()
    rng = random.Random(0)
    for _ in range(20):
        port = free_port("127.0.0.1", rng)
        assert 20000 <= port < low  # never one an outgoing connection may take as its source port meanwhile
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_free_port_skips_a_port_in_use():
    rng = random.Random(7)
    first = free_port("127.0.0.1", random.Random(7))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", first))
        held.listen()
        assert free_port("127.0.0.1", rng) != first  # the same draw, taken: the next one


def test_free_port_falls_back_to_the_kernels_pick_without_room_below_the_ephemeral_range(monkeypatch):
    monkeypatch.setattr(distributed, "ephemeral_port_range", lambda: (20500, 60999))
    port = free_port("127.0.0.1")
    assert port > 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
