"""The long version of tests/test_random_nets.py: many random networks against PyTorch on both
backends; prints how many were tried and the largest relative error per backend.

    python bench/fuzz_torch.py [--examples 200] [--backends numpy llvm]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402

from random_nets import networks  # noqa: E402
from test_random_nets import compare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--backends", nargs="+", default=["numpy", "llvm"])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    for backend in args.backends:
        errors, started = [], time.perf_counter()

        @settings(max_examples=args.examples, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(networks())
        def run(desc):
            err = compare(desc, backend)
            assume(err is not None)
            errors.append(err)
            assert err < 2e-4, f"{desc}: relative error {err:.2e}"

        run()
        print(f"{backend}: {len(errors)} networks, largest relative error {max(errors):.2e}, "
              f"{time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
