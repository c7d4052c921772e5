"""The machine's float32 matrix-multiply ceiling in GFLOP/s: the yardstick for a network's GFLOP/s.

Best of several square products through torch.mm and through NumPy's BLAS, the faster of the two.
NumPy runs in a child process because its BLAS reads its thread count only at start-up.

    python bench/sgemm.py [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

SIZES = (1024, 2048)
REPEATS = 5


def best_gflops(matmul, make) -> float:
    """Best GFLOP/s of ``matmul`` over SIZES and REPEATS (one untimed warm-up per size)."""
    best = 0.0
    for n in SIZES:
        a, b = make(n), make(n)
        matmul(a, b)
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            matmul(a, b)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def torch_gflops(threads: int) -> float:
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return best_gflops(torch.mm, lambda n: torch.randn(n, n, dtype=torch.float32))
    finally:
        torch.set_num_threads(saved)


def numpy_gflops() -> float:
    """In this process, with whatever thread count NumPy's BLAS started with."""
    import numpy as np

    rng = np.random.default_rng(0)
    return best_gflops(np.matmul, lambda n: rng.standard_normal((n, n), dtype=np.float32))


def numpy_gflops_with(threads: int) -> float:
    env = dict(os.environ, **{k: str(threads) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    done = subprocess.run([sys.executable, __file__, "--numpy-here"], env=env, capture_output=True, text=True,
                          check=True)
    return float(done.stdout)


def sgemm_ceiling(threads: int = 2) -> float:
    """GFLOP/s of the best float32 matmul on ``threads`` threads (torch.mm or NumPy)."""
    return max(torch_gflops(threads), numpy_gflops_with(threads))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--numpy-here", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.numpy_here:
        print(numpy_gflops())
        return
    torch_g, numpy_g = torch_gflops(args.threads), numpy_gflops_with(args.threads)
    print(f"sgemm ceiling on {args.threads} threads: {max(torch_g, numpy_g):.1f} GFLOP/s "
          f"(torch.mm {torch_g:.1f}, numpy {numpy_g:.1f}; float32 {'/'.join(map(str, SIZES))}-square, "
          f"best of {REPEATS})")


if __name__ == "__main__":
    main()
