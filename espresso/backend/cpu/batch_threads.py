"""Threads that run the parts of one batch side by side: the CPU backend's `over_ranges`.

BLAS threads only its GEMMs; between them a training step runs im2col, col2im, pooling and the
per-image GEMMs of a first convolution on one core (LeNet at batch 64 on 2 cores: about 5 of its
12 ms).  A layer that splits its batch instead gives each core the whole of its work on a share
of the images, every GEMM on one BLAS thread: benchmarks/results/lenet_cpu.txt measures it.
"""

import threading


class BatchThreads:
    """Daemon threads that run jobs beside the calling thread, one batch at a time.  A caller
    that finds them busy (another Python thread using a net meanwhile) is told so by `claim`
    and runs its jobs in turn itself."""

    def __init__(self):
        self._go = []  # a semaphore per worker thread
        self._done = threading.Semaphore(0)
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
            go = threading.Semaphore(0)
            threading.Thread(target=self._serve, args=(len(self._go), go), daemon=True,
                             name=f"espresso-batch-{len(self._go) + 1}").start()
            self._go.append(go)
        self._jobs[:], self._errors[:] = jobs[1:], []
        for go in self._go[:workers]:
            go.release()
        try:
            jobs[0]()
        finally:
            for _ in range(workers):
                self._done.acquire()
        if self._errors:
            raise self._errors[0]

    def _serve(self, index, go):
        while True:
            go.acquire()
            try:
                self._jobs[index]()
            except BaseException as error:  # noqa: BLE001 (handed to the caller, which raises it)
                self._errors.append(error)
            finally:
                self._done.release()
