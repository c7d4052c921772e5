"""The long sweep of strided, dilated, padded windows against PyTorch in float64 (the suite runs
a seeded sample: tests/test_lattice_sweep.py). Every valid spec of ``lattice_sweep.specs()`` at
every input size below, in networks of ``--chunk`` branches, on both backends, each spec with the
next branch width in turn (``--all-widths``: with every width); prints how many were checked and
every failure.

    python bench/lattice_sweep.py [--sizes 3x3,5x5,...] [--chunk 24] [--backends numpy,llvm] [--all-widths]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from lattice_sweep import WIDTHS, compare, describe, specs, valid  # noqa: E402

SIZES = "3x3,4x5,5x5,6x6,7x8,9x9,13x14"
TOL = 1e-10


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=SIZES)
    ap.add_argument("--chunk", type=int, default=24)
    ap.add_argument("--backends", default="numpy,llvm")
    ap.add_argument("--all-widths", action="store_true")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    checked, failures, started = 0, [], time.time()
    for size in sizes:
        chosen = [s for s in specs() if valid(s, size)]
        branches = ([(s, w) for s in chosen for w in WIDTHS] if args.all_widths
                    else [(s, WIDTHS[k % len(WIDTHS)]) for k, s in enumerate(chosen)])
        for backend in args.backends.split(","):
            for at in range(0, len(branches), args.chunk):
                chunk = branches[at:at + args.chunk]
                errors = compare(backend, chunk, size)
                checked += len(chunk)
                if max(errors[:3]) >= TOL:  # find the failing branches one by one
                    for branch in chunk:
                        e = compare(backend, [branch], size)
                        if max(e[:3]) >= TOL:
                            failures.append((backend, size, branch, e))
                            print(f"FAIL {backend} {size} {describe(branch[0])} width {branch[1]}: "
                                  f"forward {e[0]:.1e} grads {e[1]:.1e} input grad {e[2]:.1e}", flush=True)
            print(f"{size}: {len(branches)} branches per backend, {time.time() - started:.0f} s", flush=True)
    print(f"checked {checked} branch runs (spec × width × backend) over sizes {args.sizes}: "
          f"{len(failures)} wrong")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
