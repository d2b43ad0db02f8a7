"""The tensor-parallel step channel (engine/tp_channel.py) on real ZeroMQ sockets over loopback: messages arrive in
order, replies come back, a worker that takes nothing or answers nothing turns into a timeout, and a rank's page
accounting is checked field by field."""

import threading
import time

import pytest

from engine.tp_channel import STATE, STEP, STOP, ChannelTimeoutError, StepReceiver, StepSender, check_stats
from kvcache import CacheDesyncError, KVCacheStats


def _stats(**changes) -> KVCacheStats:
    values = dict(
        total_pages=100,
        free_pages=60,
        mapped_pages=40,
        reclaimable_pages=5,
        used_pages=35,
        page_size_bytes=65536,
        tokens_per_page=32.0,
        num_buffers=4,
        num_free_slots=6,
        num_active_slots=2,
        max_batch_size=8,
    )
    values.update(changes)
    return KVCacheStats(**values)


def test_messages_reach_every_worker_in_order_and_replies_come_back():
    sender = StepSender("127.0.0.1", 2, timeout_s=10.0)
    received: dict[int, list] = {1: [], 2: []}

    def worker(rank: int) -> None:
        channel = StepReceiver(sender.step_addresses[rank - 1], sender.reply_address)
        try:
            while True:
                message = channel.recv()
                received[rank].append(message)
                if message[0] == STATE:
                    channel.reply({"rank": rank, "seen": len(received[rank])})
                if message[0] == STOP:
                    return
        finally:
            channel.close()

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in (1, 2)]
    for t in threads:
        t.start()
    try:
        steps = [(STEP, [], (i,), [(1, [i, i + 1], 0)], None) for i in range(50)]
        for message in steps:
            sender.send(message)
        sender.send((STATE, [], ()))
        replies = sorted(sender.replies(2), key=lambda r: r["rank"])
        assert replies == [{"rank": 1, "seen": 51}, {"rank": 2, "seen": 51}]
        sender.send((STOP,))
        for t in threads:
            t.join(10)
        assert received[1] == received[2] == [*steps, (STATE, [], ()), (STOP,)]
    finally:
        sender.close()


def test_a_worker_that_takes_or_answers_nothing_is_a_timeout():
    sender = StepSender("127.0.0.1", 1, timeout_s=0.3)
    try:
        with pytest.raises(ChannelTimeoutError, match="rank 1 took no message"):
            sender.send((STEP, [], (), [], None))  # nobody connected: the queue takes nothing
        with pytest.raises(ChannelTimeoutError, match="1 of 1 ranks did not reply"):
            sender.replies(1)
    finally:
        sender.close()


def test_a_rank_whose_accounting_differs_is_named_with_each_field():
    expected = (100, 60, 40, 5, 2)
    check_stats(1, expected, _stats())
    with pytest.raises(CacheDesyncError, match=r"rank 3's KV cache diverged .*'free_pages': \(60, 61\)") as info:
        check_stats(3, expected, _stats(free_pages=61, num_active_slots=3))
    assert "'num_active_slots': (2, 3)" in str(info.value) and "mapped_pages" not in str(info.value)


def test_a_send_to_a_worker_that_died_gives_up_once_it_is_known_dead():
    """A worker whose process is gone takes no message: the send waits for it, and gives up as soon as the death
    watch says so, not at the channel's timeout (a step of a TP replica would otherwise hang that long)."""
    sender = StepSender("127.0.0.1", 1, timeout_s=60.0)
    received = []

    def worker() -> None:  # takes one message, then its process "dies": the sockets close
        channel = StepReceiver(sender.step_addresses[0], sender.reply_address)
        received.append(channel.recv())
        channel.close()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        sender.send((STEP, [], (), [], None))
        thread.join(10)
        assert len(received) == 1
        time.sleep(0.5)  # the disconnect reaches the sender
        dead = threading.Event()
        threading.Timer(0.5, dead.set).start()
        start = time.monotonic()
        with pytest.raises(ChannelTimeoutError, match="the workers are dead"):
            sender.send((STEP, [], (), [], None), stop=dead.is_set)
        assert time.monotonic() - start < 5  # not the 60 s timeout
        with pytest.raises(ChannelTimeoutError, match="the workers are dead"):
            sender.replies(1, stop=dead.is_set)
    finally:
        sender.close()
