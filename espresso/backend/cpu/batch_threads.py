"""Threads that run the parts of one batch side by side: the CPU backend's `over_ranges`.

BLAS threads only its GEMMs; between them a training step runs im2col, col2im, pooling and the
per-image GEMMs of a first convolution on one core (LeNet at batch 64 on 2 cores: about 5 of its
12 ms).  A layer that splits its batch instead gives each core the whole of its work on a share
of the images, every GEMM on one BLAS thread: benchmarks/results/lenet_cpu.txt measures it.
"""

import os
import threading


class BatchThreads:
    """Daemon threads that run jobs beside the calling thread, one batch at a time.  A caller
    that finds them busy (another Python thread using a net meanwhile) is told so by `claim`
    and runs its jobs in turn itself."""

    def __init__(self):
        self._start_over()
        os.register_at_fork(after_in_child=self._start_over)  # a forked child has none of the threads

    def _start_over(self):
        self._go, self._done = [], []  # a semaphore and an event per worker thread
        self._busy = threading.Lock()
        self._jobs, self._errors = [], []

    def claim(self):
        return self._busy.acquire(blocking=False)

    def release(self):
        self._busy.release()

    def run(self, jobs):
        """jobs[0]() here and the others on the workers (the caller holds `claim`); returns when
        all are done, raising the first error any of them raised."""
        workers = len(jobs) - 1
        while len(self._go) < workers:
            go, done = threading.Semaphore(0), threading.Event()
            threading.Thread(target=self._serve, args=(len(self._go), go, done), daemon=True,
                             name=f"espresso-batch-{len(self._go) + 1}").start()
            self._go.append(go)
            self._done.append(done)
        self._jobs[:], self._errors[:] = jobs[1:], []
        for go, done in zip(self._go[:workers], self._done):
            done.clear()
            go.release()
        try:
            jobs[0]()
        finally:
            self._wait(self._done[:workers])
        if self._errors:
            raise self._errors[0]

    @staticmethod
    def _wait(events):
        """Until every worker is done, even through a KeyboardInterrupt (raised after): the
        caller must not read its results, or start another batch, while a worker still runs."""
        interrupted = None
        for event in events:
            while not event.is_set():
                try:
                    event.wait()
                except BaseException as error:  # noqa: BLE001 (raised once the workers are done)
                    interrupted = error
        if interrupted is not None:
            raise interrupted

    def _serve(self, index, go, done):
        while True:
            go.acquire()
            try:
                self._jobs[index]()
            except BaseException as error:  # noqa: BLE001 (handed to the caller, which raises it)
                self._errors.append(error)
            finally:
                done.set()
