"""Background batch loading, as Caffe's BasePrefetchingDataLayer: a thread fills batch buffers
taken from a free queue and hands them over through a full queue (prefetch_free_ /
prefetch_full_), so reading the next batches overlaps the net's forward and backward.

The thread only reads and decodes; random transforms stay on the caller's thread, so a seeded
run draws the same numbers in the same order whatever the thread timing.
"""

import queue
import threading


class _Failure:
    """An exception raised in the thread, delivered to the consumer in place of a batch."""

    def __init__(self, error):
        self.error = error


class Prefetcher:
    """`fill(buffer)` loads the next batch into `buffer`; `buffers` are cycled through (at least
    two keep one batch in use while the next is read)."""

    def __init__(self, fill, buffers, name="espresso-prefetch"):
        self._free, self._full = queue.Queue(), queue.Queue()
        self._stop = threading.Event()
        for buffer in buffers:
            self._free.put(buffer)
        # the thread gets only fill and the queues, never the owning layer, so that the layer
        # can be garbage-collected (and close us through a weakref.finalize)
        self._thread = threading.Thread(target=_run, args=(fill, self._free, self._full, self._stop),
                                        name=name, daemon=True)
        self._thread.start()

    def get(self):
        """The next filled buffer (waits for it); re-raises an error from the thread."""
        item = self._full.get()
        if isinstance(item, _Failure):
            self._full.put(item)  # every later call fails the same way
            raise item.error
        return item

    def release(self, buffer):
        """Give a buffer obtained from get() back to be refilled."""
        self._free.put(buffer)

    def close(self):
        self._stop.set()
        self._free.put(None)
        # The layer's finalizer may run on this very thread (a garbage collection triggered
        # inside `fill`): then the loop ends by itself once `fill` returns, and joining would fail.
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


def _run(fill, free, full, stop):
    while not stop.is_set():
        buffer = free.get()
        if buffer is None or stop.is_set():
            return
        try:
            fill(buffer)
        except BaseException as e:  # handed to the consumer, who raises it in its own thread
            full.put(_Failure(e))
            return
        full.put(buffer)
