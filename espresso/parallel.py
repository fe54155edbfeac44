"""Data-parallel training over MPI ranks, as Caffe trained on several GPUs: one solver per rank,
each reading its own shard of the data, the gradients averaged over ranks before every update,
so every rank applies the same update and the weights stay identical everywhere.

    mpiexec -n 4 espresso train --solver solver.prototxt [--gpu 0]

or from Python, in a script that mpiexec starts:

    group = espresso.parallel.start()        # before the solver: the data layers shard by rank
    solver = espresso.get_solver("solver.prototxt")
    group.attach(solver)
    solver.solve()

MPI (mpi4py; `pip install espresso-nn[mpi]` brings MPICH, whose mpiexec needs no system step)
starts and connects the processes, on one machine or many.  The gradients are summed
over the flat gradient arena, in buckets of BUCKET_BYTES, each started as soon as the backward
pass has finished it (iter_size 1; with several passes, the whole arena after the last): on the
CPU by MPI_Iallreduce; on GPUs by NCCL (through CuPy) on a stream of its own, concurrent with
the rest of the backward pass and inside the iteration's CUDA graph, one GPU per rank (rank i of
a machine takes its GPU i), the NCCL id broadcast through MPI.  The sum is scaled
by 1/N, as Caffe's NCCL does: with each rank's loss normalized by its own batch, the update is
the one of a single solver on the combined batch of batch x N.

Caffe's rules: every rank builds its nets from one random seed (random_seed, else rank 0's),
so the data layers shuffle, skip and crop alike, then takes rank 0's weights and goes on with
random_seed + r (Caffe's seed for rank r: dropout differs by rank); a TRAIN-phase Data or
HDF5Data layer keeps record r of every N (the combined batch is N consecutive runs of
`batch_size` records, interleaved); rank 0 alone tests, logs, snapshots and plots.  A stop or
snapshot request is rank 0's, broadcast at each iteration's end.  All ranks read the resumed
snapshot (it must be on every machine); the data position saved is the combined
one, so a snapshot resumes on any number of ranks.

Failures: a rank that dies ends the job (mpiexec kills the others and names the dead process's
pid, which rank 0's start-up line maps to its rank); a rank
that waits more than ESPRESSO_MPI_TIMEOUT seconds (default 600) for the others aborts the job
with a message.  Ranks that were given different nets, solvers or Espresso versions stop at
start-up with an error naming them.
"""

import hashlib
import logging
import os
import pickle
import socket
import sys
import time

import numpy as np

from espresso import runtime
from espresso.backend import address
from espresso.errors import EspressoError

log = logging.getLogger("espresso")
BUCKET_BYTES = 16 << 20  # a few large calls: MPI's per-call cost is paid a few times, not per parameter
# the environment mpiexec gives its processes: the world size (MPICH / Open MPI / PMIx)
_WORLD_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")


def launched_ranks():
    """The number of processes mpiexec started this one among (1 outside mpiexec)."""
    for name in _WORLD_SIZE:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError:
        raise EspressoError("training over several processes needs mpi4py and an MPI: "
                            "pip install 'espresso-nn[mpi]'") from None
    return MPI


def start(comm=None):
    """The Group of this process in `comm` (MPI's world by default), set as the runtime's solver
    rank and count (so that data layers built after it shard), with rank 0's random seed on every
    rank: the nets are built alike, down to their data layers' shuffles, skips and crops."""
    group = Group(comm if comm is not None else _mpi().COMM_WORLD)
    runtime.set_solver_count(group.size)
    runtime.set_solver_rank(group.rank)
    group.seed = group.agree(int(np.random.SeedSequence().entropy % (1 << 62)) if group.rank == 0 else None)
    runtime.set_random_seed(group.seed)
    return group


class Group:
    """This process's rank among `size` in an MPI communicator, and the collective steps of
    data-parallel training."""

    def __init__(self, comm):
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        local = comm.Split_type(_mpi().COMM_TYPE_SHARED)  # the ranks of this machine: its cores, its GPUs
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.timeout = float(os.environ.get("ESPRESSO_MPI_TIMEOUT", 600))
        self.nccl, self.solver, self.buckets, self.seed = None, None, None, 0

    def attach(self, solver):
        """Make `solver` one of the group's: the same net, solver and Espresso everywhere (else an
        error), rank 0's weights everywhere, and its gradients averaged before each update."""
        import espresso

        self.check_same({"the Espresso version": espresso.__version__, "the train net": str(solver.net.param),
                         "the solver": str(solver.param)})
        solver.group, self.solver = self, solver
        net = solver.net
        if not net.backend.host_arrays:
            self.nccl = _Nccl(self, net.backend)
        if solver.param.iter_size == 1:  # (with several passes, only the last one's gradients are final)
            self.buckets = (_MpiBuckets if self.nccl is None else _NcclBuckets)(self, solver)
        self.broadcast(net.arena_data)  # the solver averages the gradients before each update (share_gradients)
        if self.rank:  # its own random stream from here (dropout), as Caffe's random_seed + rank (rank 0 goes on)
            runtime.set_random_seed((solver.param.random_seed if solver.param.random_seed >= 0 else self.seed)
                                    + self.rank)
        places = self.comm.allgather((os.getpid(), socket.gethostname()))  # mpiexec names a dead rank by pid
        log.info("Data-parallel training: rank %d of %d, effective batch = batch x %d; ranks: %s", self.rank,
                 self.size, self.size, ", ".join(f"{r} = pid {pid} on {host}" for r, (pid, host) in enumerate(places)))
        return solver

    def check_same(self, things):
        """Every rank holds the same `things` ({what: text}), else an EspressoError naming the ranks
        and what differs (on every rank: the job stops at start-up)."""
        digests = {what: hashlib.sha256(text.encode()).hexdigest() for what, text in things.items()}
        everyone = self.comm.allgather(digests)
        differ = {what: [r for r, d in enumerate(everyone) if d[what] != everyone[0][what]] for what in things}
        problems = [f"{what} of rank(s) {', '.join(map(str, ranks))} differs from rank 0's"
                    for what, ranks in differ.items() if ranks]
        if problems:
            raise EspressoError("data-parallel ranks disagree: " + "; ".join(problems) +
                                " (give every rank the same files and Espresso)")

    def broadcast(self, array):
        """Rank 0's values of `array` on every rank, in place."""
        if self.nccl is not None:
            self.nccl.broadcast(array)
        else:
            self._wait(_tested(self.comm.Ibcast(array, root=0)))

    def average(self, flat):
        """flat = the mean over ranks of flat (each rank's), in place: summed in buckets, scaled by 1/N."""
        if self.buckets is not None and flat is self.buckets.flat:
            self.buckets.finish()
        elif self.nccl is not None:
            self.nccl.all_reduce(flat)
        else:
            MPI, step = _mpi(), max(1, BUCKET_BYTES // flat.itemsize)
            for start in range(0, flat.size, step):
                self._wait(_tested(self.comm.Iallreduce(MPI.IN_PLACE, flat[start:start + step], op=MPI.SUM)))
        flat *= flat.dtype.type(1.0 / self.size)

    def agree(self, value):
        """Rank 0's `value` (a small Python object, pickled: the ranks are one job), on every rank."""
        data = pickle.dumps(value) if self.rank == 0 else b""
        size = np.array([len(data)], np.int64)
        self._wait(_tested(self.comm.Ibcast(size, root=0)))
        buffer = np.frombuffer(data, np.uint8).copy() if self.rank == 0 else np.empty(int(size[0]), np.uint8)
        self._wait(_tested(self.comm.Ibcast(buffer, root=0)))
        return pickle.loads(buffer.tobytes())

    def abort(self, message):
        """End the whole job, saying why: logged, flushed, and a moment for mpiexec to pass the
        line on before MPI_Abort kills every rank (it dropped it under load)."""
        log.error("%s", message)
        sys.stderr.flush()
        time.sleep(1)
        self.comm.Abort(1)

    def _wait(self, test):
        """The value of a collective once test() -> (done, value) says it is done; past the
        timeout, abort the whole job (a rank that stopped answering, or whose error left the
        others waiting, would otherwise hang them forever)."""
        deadline = time.monotonic() + self.timeout
        done, value = test()
        while not done:
            if time.monotonic() > deadline:
                self.abort(f"rank {self.rank}: no answer from the other ranks for {self.timeout:g} s "
                           "(ESPRESSO_MPI_TIMEOUT); aborting the job")
            time.sleep(0)
            done, value = test()
        return value


def _tested(request):
    """Group._wait's test() for an MPI request on a buffer."""
    return lambda: (request.Test(), None)


def _bucket_runs(net):
    """The gradient arena cut at parameter boundaries into runs of about BUCKET_BYTES, from its
    end: [[start, end, i]], each final once the backward pass has done layer i, the lowest
    layer using any of its parameters (the last layers' gradients are final first)."""
    flat = net.arena_diff
    base, item = address(flat), flat.itemsize
    params = {}  # arena start -> (end, the lowest layer using it)
    for i, layer in enumerate(net.engine_layers):
        for blob in layer.blobs:
            start = (address(blob.diff) - base) // item
            end, first = params.get(start, (start + blob.count, i))
            params[start] = (end, min(first, i))
    runs, run = [], None
    for start in sorted(params, reverse=True):
        end, first = params[start]
        if run is None or (run[1] - run[0]) * item >= BUCKET_BYTES:
            run = [start, end, first]
            runs.append(run)
        run[0], run[2] = start, min(run[2], first)
    return runs


class _Buckets:
    """The gradient arena's runs (_bucket_runs), each summed over the ranks as soon as the
    backward pass has made it final, while the pass goes on: on the CPU by MPI_Iallreduce (MPI
    given a turn after each layer: MPICH makes no progress of its own); on GPUs by NCCL on a
    stream of its own that waits for the layer's work on the main and side streams.  The update
    waits for all.  A solver with pycaffe callbacks (fixed point rounds the gradients in one)
    sums after them."""

    def __init__(self, group, solver):
        net = solver.net
        self.group, self.solver, self.flat, self.backend = group, solver, net.arena_diff, net.backend
        self.runs, self.pending, self.last = _bucket_runs(net), {}, None
        net.gradients_final.append(self.layer_done)

    def layer_done(self, i, deferred=False):
        if not deferred:
            if self.last is not None and i >= self.last:  # a new pass (a pass goes down): the last one
                self._wait_all()  # was not summed (a pycaffe backward, a failed capture); start over
                self.pending = {}
            self.last = i
        if self.solver._callbacks and not deferred:  # they may write the gradients: sum after them
            return
        for k, (start, end, ready) in enumerate(self.runs):
            if ready == i and k not in self.pending:
                self.pending[k] = self._start(self.flat[start:end])
        self._progress()

    def finish(self):
        """Start what a backward pass did not reach, wait for all (the update's gradients)."""
        for k in range(len(self.runs)):
            if k not in self.pending:
                self.layer_done(self.runs[k][2], deferred=True)
        self._wait_all()
        self.pending, self.last = {}, None


class _MpiBuckets(_Buckets):
    def __init__(self, group, solver):
        super().__init__(group, solver)
        self.MPI = _mpi()

    def _start(self, run):
        return self.group.comm.Iallreduce(self.MPI.IN_PLACE, run, op=self.MPI.SUM)

    def _progress(self):
        for request in self.pending.values():
            request.Test()

    def _wait_all(self):
        for request in self.pending.values():
            self.group._wait(_tested(request))


class _NcclBuckets(_Buckets):
    def __init__(self, group, solver):
        super().__init__(group, solver)
        self.stream = self.backend.xp.cuda.Stream(non_blocking=True)

    def _start(self, run):
        self.backend.queue_after(self.stream)  # the run's gradients, from either stream, are done
        self.group.nccl.all_reduce(run, self.stream)

    def _progress(self):
        pass  # NCCL's kernels progress on their own

    def _wait_all(self):
        self.backend.stream.wait_event(self.stream.record(self.backend.xp.cuda.Event(disable_timing=True)))


class _Nccl:
    """An NCCL communicator over the group's GPUs (CuPy's binding), on the backend's stream."""

    def __init__(self, group, backend):
        from cupy.cuda import nccl

        uid = group.agree(nccl.get_unique_id() if group.rank == 0 else None)
        self.nccl, self.backend = nccl, backend
        self.comm = nccl.NcclCommunicator(group.size, uid, group.rank)

    def _type(self, array):
        return {np.dtype(np.float32): self.nccl.NCCL_FLOAT32, np.dtype(np.float64): self.nccl.NCCL_FLOAT64}[
            np.dtype(array.dtype)]

    def all_reduce(self, flat, stream=None):
        """flat = its sum over the ranks, in place, queued on `stream` (default: the backend's)."""
        self.comm.allReduce(flat.data.ptr, flat.data.ptr, flat.size, self._type(flat), self.nccl.NCCL_SUM,
                            (self.backend.stream if stream is None else stream).ptr)

    def broadcast(self, array):
        self.comm.bcast(array.data.ptr, array.size, self._type(array), 0, self.backend.stream.ptr)
        self.backend.synchronize()
