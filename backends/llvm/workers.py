"""Native worker threads: the other cores' share of every phase, handed over without Python.

A Python semaphore hand-off (wake a thread, which then takes the GIL to make its ctypes call,
and signal back) cost 105–130 µs per phase on this machine, and the woken core started late.
Here each worker sits in a native loop (a Python thread that entered it once, the GIL released)
watching a generation counter: the caller writes the phase's arguments, bumps the counter, runs
thread 0's share itself and waits natively for the workers' finish count. Idle workers spin
briefly, then yield the core, then sleep between looks (200 µs, and 2 ms once idle for 0.2 s), so
a pool left alone costs next to nothing and never holds a core from other programs for long.
Measured, LeNet-5 train step, interleaved: 1.97 ms against 2.57 ms with Python threads.

One pool per thread count serves every executable of the process, one phase at a time.
The generation a worker starts from is decided before its thread starts (a worker that read the
counter itself could start after the first phase was published and wait for a later one forever).
A forked child has the pool's memory but none of its threads: its first phase starts new ones.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import threading
import time

import numpy as np

from .jit import Compiled, engine

CONTROL = ("generation", "finished", "function", "buffers", "scalars", "batch", "threads", "barrier")
YIELD_CYCLES = 10_000_000  # ≈ 4 ms of yielding before the sleeps start (cycles of the time-stamp counter)
NAP_CYCLES = 500_000_000  # ≈ 0.2 s of 200 µs naps, then 2 ms sleeps: an idle pool wakes 500 times a second
START_DELAY = "CNNCOMPILE_TEST_WORKER_START_DELAY"  # tests: seconds a worker sleeps before entering its loop

ARGUMENTS = "\n".join(f"  %p{k} = getelementptr inbounds i64, ptr %ctl, i64 {k}\n  %{name} = load {ty}, ptr %p{k}"
                      for k, (name, ty) in enumerate((("fn", "ptr"), ("bufs", "ptr"), ("scalars", "ptr"),
                                                      ("batch", "i64"), ("nt", "i64"), ("bar", "ptr")), start=2))


RUNTIME_IR = f"""
declare void @llvm.x86.sse2.pause()
declare i32 @sched_yield()
declare i32 @usleep(i32)
declare i64 @llvm.readcyclecounter()

define internal void @cc_rt_idle(i64 %spins, i64 %since) noinline {{
entry:
  %short = icmp ult i64 %spins, 2000
  br i1 %short, label %pause, label %long
pause:
  call void @llvm.x86.sse2.pause()
  ret void
long:
  %now = call i64 @llvm.readcyclecounter()
  %elapsed = sub i64 %now, %since
  %recent = icmp ult i64 %elapsed, {YIELD_CYCLES}
  br i1 %recent, label %yield, label %sleep
yield:
  %y = call i32 @sched_yield()
  ret void
sleep:
  %idle = icmp ult i64 %elapsed, {NAP_CYCLES}
  %micros = select i1 %idle, i32 200, i32 2000
  %s = call i32 @usleep(i32 %micros)
  ret void
}}

define internal i64 @cc_rt_await(ptr %slot, i64 %value, i1 %change) noinline {{
entry:
  %since = call i64 @llvm.readcyclecounter()
  br label %poll
poll:
  %spins = phi i64 [ 0, %entry ], [ %next, %idle ]
  %now = load atomic i64, ptr %slot acquire, align 8
  %moved = icmp ne i64 %now, %value
  %reached = icmp sge i64 %now, %value
  %ready = select i1 %change, i1 %moved, i1 %reached
  br i1 %ready, label %out, label %idle
idle:
  call void @cc_rt_idle(i64 %spins, i64 %since)
  %next = add i64 %spins, 1
  br label %poll
out:
  ret i64 %now
}}

define void @cc_rt_serve(ptr %ctl, i64 %tid, i64 %g0) {{
entry:
  %finished = getelementptr inbounds i64, ptr %ctl, i64 1
  br label %wait
wait:
  %seen = phi i64 [ %g0, %entry ], [ %g, %run ]
  %g = call i64 @cc_rt_await(ptr %ctl, i64 %seen, i1 1)
  %stop = icmp eq i64 %g, -1
  br i1 %stop, label %stopped, label %run
run:
{ARGUMENTS}
  call void %fn(ptr %bufs, ptr %scalars, i64 %batch, i64 %tid, i64 %nt, ptr %bar)
  %old = atomicrmw add ptr %finished, i64 1 acq_rel
  br label %wait
stopped:
  ret void
}}

define void @cc_rt_wait(ptr %ctl, i64 %target) {{
entry:
  %finished = getelementptr inbounds i64, ptr %ctl, i64 1
  %done = call i64 @cc_rt_await(ptr %finished, i64 %target, i1 0)
  ret void
}}
"""

_runtime: dict = {}
_pools: dict[int, Workers] = {}
_pools_lock = threading.Lock()


def runtime() -> tuple:
    """The serve and wait functions, compiled once per process (the caller holds the pools' lock)."""
    if not _runtime:
        _runtime["code"] = Compiled(RUNTIME_IR)
        address = engine().get_function_address
        _runtime["serve"] = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)(
            address("cc_rt_serve"))
        _runtime["wait"] = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(address("cc_rt_wait"))
    return _runtime["serve"], _runtime["wait"]


def enter(serve, ctl: int, tid: int, generation: int) -> None:
    """A worker thread's body: the native loop, from ``generation`` on (the test hook can delay
    the start, as a busy machine may)."""
    delay = os.environ.get(START_DELAY)
    if delay:
        time.sleep(float(delay))
    serve(ctl, tid, generation)


def pool(n: int) -> Workers:
    """The process's pool of ``n`` threads (the caller and n − 1 workers)."""
    with _pools_lock:
        if not _pools:
            atexit.register(stop_all)
        if n not in _pools:
            _pools[n] = Workers(n)
        return _pools[n]


def stop_all() -> None:
    """Bring every worker out of its loop before the interpreter exits: the loop's code lives in
    the JIT's memory, which goes when the engine is finalized (a worker left in it would crash)."""
    with _pools_lock:
        for workers in _pools.values():
            workers.stop()
        _pools.clear()


def _after_fork_in_child() -> None:
    """The child of a fork has copies of the pools but not their threads, and a lock held by a
    thread of the parent stays held: fresh locks now, fresh threads at each pool's next phase."""
    global _pools_lock
    _pools_lock = threading.Lock()
    for workers in _pools.values():
        workers.lock = threading.Lock()
        workers.threads = []


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Workers:
    """``n − 1`` native workers; `run` calls a phase function on every thread index."""

    def __init__(self, n: int):
        self.n = n
        self.lock = threading.Lock()
        self.start()

    def start(self) -> None:
        """A fresh control block and ``n − 1`` threads serving it (made by this process)."""
        self.pid = os.getpid()
        self.ctl = np.zeros(len(CONTROL) + 8, np.int64)  # (lives as long as its threads)
        self.finished = 0
        self.threads = []
        if self.n > 1:
            serve, self.wait = runtime()
            generation = int(self.ctl[0])  # every worker waits for the next one, however late it starts
            self.threads = [threading.Thread(target=enter, args=(serve, self.ctl.ctypes.data, k, generation),
                                             daemon=True, name=f"cnncompile-worker-{k}") for k in range(1, self.n)]
            for thread in self.threads:
                thread.start()

    def stop(self) -> None:
        with self.lock:
            self.ctl[0] = -1  # (the generation the workers leave their loop at)
            for thread in self.threads:
                thread.join()

    def run(self, function, buffers: int, scalars: int, batch: int, barrier: int) -> None:
        """A phase ``function`` (ctypes) on every thread index: thread 0 here, the rest on the
        workers. Once stopped (the interpreter is exiting), the caller runs the phase alone."""
        with self.lock:
            if self.n == 1 or self.ctl[0] < 0:
                function(buffers, scalars, batch, 0, 1, barrier)
                return
            if self.pid != os.getpid():  # a forked child: the parent's workers are not here
                self.start()
            ctl = self.ctl
            ctl[2:8] = (ctypes.cast(function, ctypes.c_void_p).value, buffers, scalars, batch, self.n, barrier)
            ctl[0] += 1  # published after the arguments (x86 keeps stores in order)
            function(buffers, scalars, batch, 0, self.n, barrier)
            self.finished += self.n - 1
            self.wait(ctl.ctypes.data, self.finished)

