"""Phase drivers: a function per phase that calls its kernels in order with the threads'
barrier between them, and the modules they are assembled into. Text only (no sympy): a warm
start writes the drivers that run a train step's kernels one at a time from the stored calls."""
from __future__ import annotations

import re


def driver(prefix: str, phase: str, calls, tensor_ids: dict[str, int]) -> str:
    """``@{prefix}_{phase}``: each call (a kernel function and the tensors it takes, by name)
    with its buffers read from the phase's table of pointers, then the barrier."""
    lines = ["entry:", "  %sense = alloca i32", "  %shared = getelementptr inbounds i32, ptr %bar, i64 1",
             "  %s0 = load atomic i32, ptr %shared acquire, align 4", "  store i32 %s0, ptr %sense"]
    n = 0
    for name, tensors in calls:
        args = []
        for t in tensors:
            n += 1
            lines.append(f"  %slot{n} = getelementptr inbounds ptr, ptr %bufs, i64 {tensor_ids[t]}")
            lines.append(f"  %buf{n} = load ptr, ptr %slot{n}")
            args.append(f"ptr %buf{n}")
        lines.append(f"  call void {name}({', '.join(args)}, ptr %scalars, i64 %B, i64 %tid, i64 %nt)")
        lines.append("  call void @cc_barrier(ptr %bar, ptr %sense, i64 %nt)")
    lines.append("  ret void")
    return (f"define void @{prefix}_{phase}(ptr %bufs, ptr %scalars, i64 %B, i64 %tid, i64 %nt, ptr %bar) "
            "{\n" + "\n".join(lines) + "\n}\n")


def unit_phase(phase: str, j: int) -> str:
    """The phase that runs kernel ``j`` of ``phase`` alone (the NaN guard replays a step this way)."""
    return f"{phase}_u{j}"


def unit_drivers(prefix: str, phase: str, calls, tensor_ids: dict[str, int]) -> list[str]:
    return [driver(prefix, unit_phase(phase, j), [call], tensor_ids) for j, call in enumerate(calls)]


def declare(name: str, tensors: int) -> str:
    """How a module that calls a kernel function defined in another declares it (a kernel takes
    its tensors, then the scalars, then three integers: see `module.ModuleWriter.write_kernel`)."""
    return f"declare void {name}({', '.join(['ptr'] * (tensors + 1))}, i64, i64, i64)"


def declaration(function_text: str) -> str:
    """`declare` for a function from its text."""
    header = re.search(r"define (?:internal )?void (@[\w.$-]+)\(([^)]*)\)", function_text)
    return declare(header[1], header[2].count("ptr") - 1)


def assemble(head: str, functions: list[str], drivers: list[str], declarations: list[str], n: int,
             internal: bool = False) -> list[str]:
    """``n`` modules of about equal size, so that LLVM can optimize them in parallel: the drivers
    and the barrier in the first, functions spread over all, declared where the drivers call them
    (``declarations``: those defined by modules compiled before). ``internal``: one module whose
    functions nothing outside calls (what ``model.source`` shows); otherwise every function is
    exported, for the modules compiled later to call."""
    if not internal:
        functions = [f.replace("define internal void", "define void", 1) for f in functions]
    barrier = [BARRIER] if drivers else []
    if n <= 1:
        return ["\n".join([head, *barrier, *declarations, *functions, *drivers])]
    bins = [[] for _ in range(n)]
    sizes = [sum(len(d) for d in drivers)] + [0] * (n - 1)
    for text in sorted(functions, key=len, reverse=True):
        k = sizes.index(min(sizes))
        bins[k].append(text)
        sizes[k] += len(text)
    elsewhere = [declaration(f) for b in bins[1:] for f in b]
    first = [head, *barrier, *declarations, *elsewhere, *bins[0], *drivers]
    return ["\n".join(first)] + ["\n".join([head, *b]) for b in bins[1:] if b]


BARRIER_DECLARES = "declare void @llvm.x86.sse2.pause()\ndeclare i32 @sched_yield()"
BARRIER = """define internal void @cc_barrier(ptr %bar, ptr %sense, i64 %nt) noinline {
entry:
  %single = icmp sle i64 %nt, 1
  br i1 %single, label %done, label %arrive
arrive:
  %s = load i32, ptr %sense
  %ns = xor i32 %s, 1
  store i32 %ns, ptr %sense
  %shared = getelementptr inbounds i32, ptr %bar, i64 1
  %old = atomicrmw add ptr %bar, i32 1 acq_rel
  %old64 = sext i32 %old to i64
  %nt1 = sub i64 %nt, 1
  %last = icmp eq i64 %old64, %nt1
  br i1 %last, label %release, label %spin
release:
  store atomic i32 0, ptr %bar monotonic, align 4
  store atomic i32 %ns, ptr %shared release, align 4
  br label %done
spin:
  %spins = phi i64 [ 0, %arrive ], [ %next, %pause ], [ 0, %yield ]
  %cur = load atomic i32, ptr %shared acquire, align 4
  %same = icmp eq i32 %cur, %ns
  br i1 %same, label %done, label %pause
pause:
  call void @llvm.x86.sse2.pause()
  %next = add i64 %spins, 1
  %long = icmp ugt i64 %next, 4000
  br i1 %long, label %yield, label %spin
yield:
  %ignored = call i32 @sched_yield()
  br label %spin
done:
  ret void
}
"""
