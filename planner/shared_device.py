"""Engines that share one device slow each other down: processor sharing on a simulated clock.

The profile times one engine alone on its device. When several engines sit on one device
(two workers with num_gpus=0.5 on one GPU; every worker of a CPU host on its cores) and run
steps at the same time, each step's device work advances at

    rate = min(1, capacity / sum of the weights of the engines with device work left)

  - a GPU shared by k engines: capacity 1, weight 1 each, so each runs at 1/k while k have
    kernels to run (the GPU time-slices between processes, whose kernels do not run
    concurrently without MPS);
  - a CPU host: capacity = its cores, weight = the threads each engine computes with, so
    engines that together use no more threads than there are cores do not slow each other.

On a CPU host the front end and router (one process, one thread at a time) compute there
too: their CPU per request, prompt token and streamed token (measured by
deploy/frontend_probe.py into the profile) is background work on the host (add_background).

A step is (serial, host, device) seconds (CostModel.step_parts): device work is shared as
above, host work overlaps it on the engine's own CPU thread and is not shared (on a GPU host;
on a CPU all of a step is device work), so a step that starts at t0 ends at
max(t0 + serial + host, when its device work is done + serial); alone that is the profile's
serial + max(host, device).

An approximation: time-slicing is neither instantaneous nor fair to the microsecond, an eager
engine's kernels arrive spread over its launches rather than all at once, and memory
bandwidth or caches shared by CPU engines that do not oversubscribe the cores are not
modelled.
"""
from __future__ import annotations

from dataclasses import dataclass

_EPS = 1e-9   # seconds of device work: less is rounding


@dataclass
class DeviceLayout:
    """How a cluster's engines sit on devices: `engines_per_device` engines on each device
    (decode workers first, then prefill workers, in order; 1: every engine alone), each of
    `weight` on a device of `capacity` (see the module docstring)."""
    engines_per_device: int = 1
    capacity: float = 1.0
    weight: float = 1.0
    # The front end and router run on the device's cores too (a CPU host): their CPU work
    # (the profile's frontend_cpu_* overheads) takes a share of it.
    frontend_on_device: bool = False

    def __post_init__(self):
        if self.engines_per_device < 1 or not self.capacity > 0 or not self.weight > 0:
            raise ValueError(f"device layout: engines_per_device >= 1, capacity and weight > 0; got {self}")

    @property
    def on_cpu_host(self) -> bool:
        """The engines compute on a CPU host's cores, which the front end shares (only
        DeviceLayout.cpu_host builds such a layout)."""
        return self.frontend_on_device

    @property
    def shared(self) -> bool:
        return self.frontend_on_device or (self.engines_per_device > 1
                                           and self.weight * self.engines_per_device > self.capacity)

    def describe(self) -> str:
        front = ", with the front end" if self.frontend_on_device else ""
        if self.engines_per_device == 1 and not self.frontend_on_device:
            return "one engine per device"
        return (f"{self.engines_per_device} engine(s) per device (capacity {self.capacity:g}, "
                f"{self.weight:g} each{front})")

    @classmethod
    def gpu_share(cls, engines_per_gpu: int) -> "DeviceLayout":
        """k engines time-slicing each GPU."""
        return cls(engines_per_device=int(engines_per_gpu), capacity=1.0, weight=1.0)

    @classmethod
    def cpu_host(cls, engines: int, cores: float, threads_per_engine: float) -> "DeviceLayout":
        """Every engine on one CPU host of `cores` cores, each computing with its threads."""
        return cls(engines_per_device=max(1, int(engines)), capacity=float(cores), weight=float(threads_per_engine),
                   frontend_on_device=True)


class _Job:
    __slots__ = ("left", "weight", "on_done")

    def __init__(self, work: float, weight: float, on_done):
        self.left, self.weight, self.on_done = work, weight, on_done


class SharedDevice:
    """One device's work in progress. `run(work, on_done)` starts `work` seconds (alone) of
    device work; on_done() is called on the simulated clock when it is done."""

    def __init__(self, sim, capacity: float = 1.0, weight: float = 1.0):
        self.sim, self.capacity, self.weight = sim, float(capacity), float(weight)
        self.jobs: list[_Job] = []
        self._since = 0.0         # jobs' `left` is as of this time
        self._version = 0         # bumps whenever the set of jobs changes: older wake-ups are stale
        self.busy_s = 0.0         # time with any device work in progress
        self.shared_s = 0.0       # time with work slowed by another engine's
        self._background: _Job | None = None

    def add_background(self, work: float) -> None:
        """CPU work of a process that is no engine (the front end and router on a CPU host:
        one thread, weight 1), queued behind its earlier work; nothing waits for it, it
        only takes its share of the device while it lasts."""
        if work <= 0:
            return
        self._advance()
        if self._background is not None and self._background in self.jobs:
            self._background.left += work
        else:
            self._background = _Job(work, 1.0, lambda: None)
            self.jobs.append(self._background)
        self._plan()

    def rate(self) -> float:
        total = sum(j.weight for j in self.jobs)
        return 1.0 if total <= self.capacity else self.capacity / total

    def run(self, work: float, on_done) -> None:
        self._advance()
        if work <= 0:
            on_done()
            return
        self.jobs.append(_Job(work, self.weight, on_done))
        self._plan()

    def _advance(self) -> None:
        now = self.sim.now
        dt = now - self._since
        if dt > 0 and self.jobs:
            r = self.rate()
            for j in self.jobs:
                j.left -= dt * r
            self.busy_s += dt
            if r < 1.0:
                self.shared_s += dt
        self._since = now

    def _plan(self) -> None:
        self._version += 1
        if self.jobs:
            r = self.rate()
            nearest = min(j.left for j in self.jobs)
            self.sim.at(self.sim.now + max(0.0, nearest) / r, self._wake, self._version)

    def _wake(self, version: int) -> None:
        if version != self._version:
            return
        self._advance()
        done = [j for j in self.jobs if j.left <= _EPS]
        self.jobs = [j for j in self.jobs if j not in done]
        self._plan()
        for j in done:
            j.on_done()


# ---- which layout: a bench record's, the user's, or the profile's host ---------------------------------
def threads_under_ray(num_cpus: float) -> int:
    """The OpenMP threads Ray gives an actor that asks num_cpus (ray._private.utils
    set_omp_num_threads_if_unset): max(1, floor(num_cpus)); torch computes with that many."""
    return max(1, int(num_cpus // 1))


def profile_host_layout(hardware: dict, engines: int) -> DeviceLayout:
    """`engines` engines on a profile's host as a local cluster places them: on a CPU host all
    on its cores, each with the one thread Ray gives a worker that asks at most one CPU
    (threads_under_ray); on a GPU host one engine per GPU."""
    if hardware["device"] == "cpu":
        return DeviceLayout.cpu_host(engines, float(hardware.get("cpu_cores") or 1), 1.0)
    return DeviceLayout()


def layout_from_bench(rec: dict) -> DeviceLayout:
    """The layout `pdserve bench` recorded for one mode (deploy/bench.py device_layout): GPU
    workers with num_gpus g < 1 are packed 1/g to a GPU; CPU workers all share the host's
    cores, each with the threads Ray gives it."""
    pools = [p for p in rec["pools"].values() if p["replicas"] > 0]
    engines = sum(int(p["replicas"]) for p in pools)
    if pools and all(float(p["num_gpus"]) > 0 for p in pools):
        share = min(float(p["num_gpus"]) for p in pools)
        return DeviceLayout.gpu_share(max(1, round(1.0 / share)) if share < 1 else 1)
    threads = max(threads_under_ray(float(p["num_cpus"])) for p in pools) if pools else 1
    return DeviceLayout.cpu_host(engines, float(rec["host"]["cpu_cores"]), threads)
