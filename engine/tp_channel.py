"""The step channel of a tensor-parallel replica: how rank 0 feeds the other ranks, one ZeroMQ message per step.

Rank 0 binds one PUSH socket per worker and a PULL socket for replies; each worker connects a PULL to its own PUSH
and a PUSH to the replies. A step message is pickled once and pushed to every worker: no Ray call and no reply per
step, so rank 0 goes on to its own forward at once and the workers follow (the collectives inside the model keep the
ranks in step on the device). A rank checks its own cache against rank 0's accounting after each replay and fails
loudly if they differ; it answers only when asked for its state.

Messages (tuples, first field the kind):

- ``(STEP, ops, expected, seqs, prev)``: replay ``ops`` (rank 0's ``kvcache.CacheOp`` s since the last message),
  check the cache's stats against ``expected`` (:func:`checked_stats` of rank 0 after the same operations), then run
  the forward of ``seqs``. ``prev`` is ``None``, or ``(prev_rows, num_ids, dtype)`` when some input ids are the
  previous step's samples, still on rank 0's device: rank 0 broadcasts those ``num_ids`` ids over the process group
  before its forward, and the rank receives them before its own (see ``ModelRunner.run``).
- ``(STATE, ops, expected)``: replay and check as above, then reply with the rank's ``cache_state()``.
- ``(STOP,)``: leave the loop.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from typing import Any

from engine.distributed import server_port_range
from kvcache import CacheDesyncError

STEP, STATE, STOP = "step", "state", "stop"
# How often a send or a wait for replies checks whether it should give up (the workers are known dead).
POLL_S = 0.05

# Fields of ``KVCacheStats`` that must agree between a rank's cache and rank 0's after the same operations.
CHECKED_STATS = ("total_pages", "free_pages", "mapped_pages", "reclaimable_pages", "num_active_slots")


def checked_stats(stats) -> tuple[int, ...]:
    return tuple(getattr(stats, f) for f in CHECKED_STATS)


def check_stats(rank: int, expected: tuple[int, ...], stats) -> None:
    """Raise ``CacheDesyncError`` naming every checked field where rank ``rank``'s ``stats`` differ from rank 0's
    (``expected``: :func:`checked_stats` of rank 0 after the same operations)."""
    diff = {f: (want, got) for f, want, got in zip(CHECKED_STATS, expected, checked_stats(stats)) if want != got}
    if diff:
        raise CacheDesyncError(f"rank {rank}'s KV cache diverged from rank 0's (field: (rank 0, rank {rank})): {diff}")


def cache_state(rank: int, cache) -> dict:
    """A rank's answer to ``STATE``: its cache stats and the page ids of every active slot (tests compare ranks)."""
    slots = {s: cache.slot_page_ids(s) for s in range(1, cache.config.max_batch_size + 1) if cache.is_active(s)}
    return {"rank": rank, "stats": cache.stats(), "slot_page_ids": slots, "num_kv_heads": cache.config.num_kv_heads}


class ChannelTimeoutError(RuntimeError):
    """A worker did not take a message, or did not reply, in time."""


class StepSender:
    """Rank 0's end: one PUSH socket per worker (``step_addresses``, in rank order) and one PULL for replies
    (``reply_address``), bound on ``host``.

    Args:
        host: the address the workers reach rank 0 at (loopback: a replica's ranks share its node).
        num_workers: ranks ``1 .. num_workers``.
        timeout_s: how long :meth:`send` may wait for a worker to take a message (its queue is full or it is
            gone) and :meth:`replies` for their answers.
    """

    def __init__(self, host: str, num_workers: int, timeout_s: float) -> None:
        import zmq  # pyzmq: imported where a tensor-parallel replica starts, not by every user of the engine

        self._zmq = zmq
        self._context = zmq.Context()
        self.timeout_s = timeout_s
        low, high = server_port_range()
        self._pushes = []
        self.step_addresses = []
        for _ in range(num_workers):
            push = self._context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            port = push.bind_to_random_port(f"tcp://{host}", min_port=low, max_port=high)
            self._pushes.append(push)
            self.step_addresses.append(f"tcp://{host}:{port}")
        self._replies = self._context.socket(zmq.PULL)
        self._replies.setsockopt(zmq.LINGER, 0)
        port = self._replies.bind_to_random_port(f"tcp://{host}", min_port=low, max_port=high)
        self.reply_address = f"tcp://{host}:{port}"

    def send(self, message: tuple, timeout_s: float | None = None, stop: Callable[[], bool] | None = None) -> None:
        """Push ``message`` to every worker: returns once each queue took it. Raises ``ChannelTimeoutError`` when one
        took nothing within ``timeout_s`` (by default the channel's), or as soon as ``stop()`` is true (checked every
        ``POLL_S``: the workers are known dead). A worker whose process is gone takes nothing: without ``stop`` the
        send would wait out the whole timeout."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        for rank, push in enumerate(self._pushes, start=1):
            while True:  # a queue with room takes it at once: no poll on the step's path
                try:
                    push.send(data, self._zmq.NOBLOCK, copy=False)
                    break
                except self._zmq.Again:
                    pass
                if stop is not None and stop():
                    raise ChannelTimeoutError(f"rank {rank} took no message: the workers are dead")
                if time.monotonic() >= deadline:
                    raise ChannelTimeoutError(f"rank {rank} took no message for {timeout_s} s")
                push.poll(POLL_S * 1000, self._zmq.POLLOUT)

    def replies(self, count: int, stop: Callable[[], bool] | None = None) -> list[Any]:
        """The next ``count`` replies, in arrival order (raising as :meth:`send` does)."""
        out = []
        deadline = time.monotonic() + self.timeout_s
        while len(out) < count:
            if self._replies.poll(POLL_S * 1000):
                out.append(pickle.loads(self._replies.recv()))
            elif stop is not None and stop():
                raise ChannelTimeoutError(f"{count - len(out)} of {count} ranks did not reply: the workers are dead")
            elif time.monotonic() >= deadline:
                raise ChannelTimeoutError(
                    f"{count - len(out)} of {count} ranks did not reply within {self.timeout_s} s"
                )
        return out

    def close(self) -> None:
        for socket in (*self._pushes, self._replies):
            socket.close(linger=0)
        self._context.term()


class StepReceiver:
    """A worker's end: pulls rank 0's messages from ``step_address``, pushes replies to ``reply_address``. Lives in
    the thread that uses it (ZeroMQ sockets are not thread-safe)."""

    def __init__(self, step_address: str, reply_address: str) -> None:
        import zmq

        self._context = zmq.Context()
        self._steps = self._context.socket(zmq.PULL)
        self._steps.setsockopt(zmq.LINGER, 0)
        self._steps.connect(step_address)
        self._replies = self._context.socket(zmq.PUSH)
        self._replies.setsockopt(zmq.LINGER, 1000)
        self._replies.connect(reply_address)

    def recv(self) -> tuple:
        """The next message (blocks: an idle replica sends nothing)."""
        return pickle.loads(self._steps.recv(copy=False).buffer)

    def reply(self, value: Any) -> None:
        self._replies.send(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))

    def close(self) -> None:
        self._steps.close(linger=0)
        self._replies.close()
        self._context.term()
