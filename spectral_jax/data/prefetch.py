"""Background prefetch of the coming steps' batches."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from spectral_jax.validation import positive_int

T = TypeVar("T")
_DONE = object()


def prefetch(make: Callable[[int], T], steps: Iterable[int], depth: int = 2) -> Iterator[T]:
    """``make(step)`` for each of ``steps`` in order, computed up to ``depth`` steps ahead in
    a background thread, so host-side loading overlaps the device's work. An exception in
    ``make`` is raised here, at the step it belongs to."""
    positive_int("prefetch", "depth", depth)
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for step in steps:
                item = (make(step), None)
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:  # handed to the consumer
            ready.put((None, err))
            return
        ready.put((_DONE, None))

    worker = threading.Thread(target=produce, name="spectral_jax-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, err = ready.get()
            if err is not None:
                raise err
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                ready.get(timeout=0.1)
            except queue.Empty:
                continue
