"""Energy from real counters where the machine has them, an estimate (said to be one) where not.

GPU: NVML's total-energy counter (millijoules since the driver loaded, Volta and later), read
through the NVML library the driver installs (ctypes; no package); where it is missing, the
power reading sampled every 10 ms and integrated.  CPU: Linux RAPL's package counter
(/sys/class/powercap/intel-rapl:*/energy_uj, AMD's too) where this user may read it; else an
estimate, E = busy CPU seconds of this process x watts per busy core, with its formula and
inputs in the report.  Idle power is measured before the work and reported apart, so J/image
comes both in total and above idle.
"""

import ctypes
import glob
import os
import threading
import time

from espresso.errors import EspressoError

WATTS_PER_CORE = 5.0  # the estimate's default: a server core's share of its package power under load
RAPL = "/sys/class/powercap/intel-rapl:[0-9]/energy_uj"  # package-level zones (sub-zones are parts of them)


class _NVML:
    """The few NVML calls used, on GPU `index` (NVML's order, which CUDA_VISIBLE_DEVICES does not change)."""

    def __init__(self, index):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self._check(self.lib.nvmlInit_v2())
        self.handle = ctypes.c_void_p()
        self._check(self.lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(self.handle)))

    @staticmethod
    def _check(status):
        if status != 0:
            raise OSError(f"NVML call failed with status {status}")

    def energy_joules(self):
        """The total-energy counter, or None where the GPU has none."""
        value = ctypes.c_ulonglong()
        status = self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle, ctypes.byref(value))
        return value.value / 1e3 if status == 0 else None

    def power_watts(self):
        value = ctypes.c_uint()
        self._check(self.lib.nvmlDeviceGetPowerUsage(self.handle, ctypes.byref(value)))
        return value.value / 1e3

    def text(self, function, *args):
        buffer = ctypes.create_string_buffer(96)
        status = getattr(self.lib, function)(*args, buffer, ctypes.c_uint(96))
        return buffer.value.decode() if status == 0 else "unknown"

    def describe(self):
        return {"gpu": self.text("nvmlDeviceGetName", self.handle), "driver": self.text("nvmlSystemGetDriverVersion")}


class _PowerSampler(threading.Thread):
    """Integrates sampled power (the fallback where the energy counter is missing)."""

    def __init__(self, read_watts, period=0.01):
        super().__init__(daemon=True)
        self.read_watts, self.period, self.joules = read_watts, period, 0.0
        self.stopped = threading.Event()

    def run(self):
        last = time.perf_counter()
        while not self.stopped.wait(self.period):
            now = time.perf_counter()
            self.joules += self.read_watts() * (now - last)
            last = now

    def stop(self):
        self.stopped.set()
        self.join()
        return self.joules


class Meter:
    """Energy of one device over a `with meter.measure() as m:` block: m.joules, m.seconds.
    `kind` says what the figure is: "nvml-counter", "nvml-power-samples", "rapl" or
    "estimate" (then `formula` and `inputs` say how it was made)."""

    def __init__(self, device, gpu_index=0, watts_per_core=WATTS_PER_CORE):
        self.device, self.formula, self.inputs, self.idle_watts = device, None, {}, None
        self._nvml = self._rapl = None
        if device == "gpu":
            try:
                self._nvml = _NVML(gpu_index)
            except OSError as e:
                raise EspressoError(f"GPU energy needs NVML (libnvidia-ml.so.1, installed with the NVIDIA "
                                    f"driver): {e}") from None
            self.kind = "nvml-counter" if self._nvml.energy_joules() is not None else "nvml-power-samples"
        else:
            self._rapl = _readable_rapl()
            self.kind = "rapl" if self._rapl else "estimate"
            if not self._rapl:
                self.watts_per_core = watts_per_core
                self.formula = "E = busy CPU seconds of this process (user + system) x watts per busy core"
                self.inputs = {"watts_per_busy_core": watts_per_core,
                               "why": "no RAPL counter readable here (/sys/class/powercap)"}

    def describe(self):
        out = {"kind": self.kind, "idle_watts": self.idle_watts}
        if self.formula:
            out.update(formula=self.formula, inputs=self.inputs)
        if self._nvml is not None:
            out.update(self._nvml.describe())
        return out

    def measure_idle(self, seconds=1.0):
        """Power with nothing running (an estimate has no idle part: it counts busy time only)."""
        if self.kind == "estimate":
            self.idle_watts = 0.0
        else:
            with self.measure() as m:
                time.sleep(seconds)
            self.idle_watts = m.joules / m.window_seconds
        return self.idle_watts

    def measure(self):
        return _Measurement(self)

    def _read(self):
        if self.kind == "nvml-counter":
            return self._nvml.energy_joules()
        if self.kind == "rapl":
            return sum(_rapl_joules(path) for path in self._rapl)
        if self.kind == "estimate":
            times = os.times()
            return (times.user + times.system) * self.watts_per_core
        return None


class _Measurement:
    def __init__(self, meter):
        self.meter, self.joules, self.seconds = meter, None, None

    def __enter__(self):
        m = self.meter
        self._sampler = _PowerSampler(m._nvml.power_watts) if m.kind == "nvml-power-samples" else None
        if self._sampler:
            self._sampler.start()
        self._start, self._window_start = self._tick()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        end, window_end = self._tick()
        joules = self._sampler.stop() if self._sampler else _wrapped(end - self._start, self.meter)
        # the counter's window ran past the work by the wait for its ticks: that tail was idle
        self.window_seconds = window_end - self._window_start
        idle = self.meter.idle_watts or 0.0
        self.joules = joules - idle * max(self.window_seconds - self.seconds, 0.0)
        return False

    def _tick(self):
        """(reading, time) just after the counter changed: NVML's counter moves in steps (tens of
        ms apart), so a block measured between two steps is exact to the step, not to its period."""
        first = self.meter._read()
        if self.meter.kind != "nvml-counter":
            return first, time.perf_counter()
        deadline = time.perf_counter() + 0.5
        while time.perf_counter() < deadline:
            value = self.meter._read()
            if value != first:
                return value, time.perf_counter()
            time.sleep(0.001)
        return first, time.perf_counter()


def _wrapped(delta, meter):
    """A RAPL counter wraps at max_energy_range_uj."""
    if delta < 0 and meter.kind == "rapl":
        delta += sum(_rapl_range(path) for path in meter._rapl)
    return delta


def _readable_rapl():
    """The package-level RAPL counters this user can read."""
    paths = sorted(glob.glob(RAPL))
    try:
        for path in paths:
            _rapl_joules(path)
    except OSError:
        return []
    return paths


def _rapl_joules(path):
    with open(path) as f:
        return int(f.read()) / 1e6


def _rapl_range(path):
    with open(os.path.join(os.path.dirname(path), "max_energy_range_uj")) as f:
        return int(f.read()) / 1e6
