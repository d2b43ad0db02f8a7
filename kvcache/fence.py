"""Fences: points in the device's queue of work, after which memory that the work touched may be unmapped or reused.

A GPU runs kernels long after the host launched them, and ``cuMemUnmap`` does not wait for them: a page unmapped under
a queued kernel makes that kernel fault, which ends the process. So the cache unmaps, or hands a slot to another
request, only once the fence of the last step that touched the slot is complete.

On the CPU every kernel has run by the time its call returns, yet ``HostFence`` counts a step as unfinished until the
host waited on its fence or on a later one, as the GPU would: the CPU engine then follows the GPU's discipline, and
tests on the CPU catch what would fault on the GPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Fence(ABC):
    """Marks the work launched before it; complete once all of it has finished."""

    @abstractmethod
    def is_complete(self) -> bool:
        """Whether the work before the fence has finished (never blocks)."""

    @abstractmethod
    def wait(self) -> None:
        """Block until the work before the fence has finished."""


class CudaFence(Fence):
    """A CUDA event recorded on the device's current stream."""

    def __init__(self, device: torch.device) -> None:
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(device))
        self._done = False

    def is_complete(self) -> bool:
        if not self._done:
            self._done = self._event.query()
        return self._done

    def wait(self) -> None:
        if not self._done:
            self._event.synchronize()
            self._done = True


class HostTimeline:
    """Orders the ``HostFence`` s of one device: waiting on a fence completes it and every earlier one."""

    def __init__(self) -> None:
        self.num_recorded = 0
        self.num_waited = 0

    def record(self) -> HostFence:
        self.num_recorded += 1
        return HostFence(self, self.num_recorded)


class HostFence(Fence):
    """A fence of host work: complete once the host waited on it or on a later fence of its timeline."""

    def __init__(self, timeline: HostTimeline, sequence: int) -> None:
        self._timeline = timeline
        self.sequence = sequence

    def is_complete(self) -> bool:
        return self._timeline.num_waited >= self.sequence

    def wait(self) -> None:
        self._timeline.num_waited = max(self._timeline.num_waited, self.sequence)
