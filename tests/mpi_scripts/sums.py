"""Under ``mpirun``: bucketed, overlapped sums (`Group.start_sum`) against one sum of the whole
vector and against the ranks' vectors added in rank order; each rank prints "same bits" when
all three agree bit for bit."""
import numpy as np

from cnncompile.distributed import Group


def contribution(rank: int) -> np.ndarray:
    """What rank ``rank`` adds: float32 values of mixed magnitudes (their sum's bits depend on the order)."""
    rng = np.random.default_rng(rank)
    return (rng.standard_normal(1001) * 10.0 ** rng.integers(-4, 5, 1001)).astype(np.float32)


def main():
    group = Group()
    mine = contribution(group.rank)
    whole = group.sum(mine)
    cuts = [0, 1, 7, 300, 301, 1001]  # buckets of 1, 6, 293, 1 and 700 values
    started = []
    for k, (start, stop) in enumerate(zip(cuts, cuts[1:])):
        started.append(group.start_sum(mine[start:stop]))
        if k == 2:  # a blocking sum while buckets are in flight
            group.sum(mine[:5])
        group.progress()
    group.finish(started)
    bucketed = np.concatenate([s.out for s in started])
    in_order = contribution(0)
    for k in range(1, group.size):
        in_order += contribution(k)
    if np.array_equal(bucketed, whole) and np.array_equal(whole, in_order):
        print(f"rank {group.rank}: same bits", flush=True)
    else:
        print(f"rank {group.rank}: differ at {np.flatnonzero(bucketed != in_order)[:10]}", flush=True)


if __name__ == "__main__":
    main()
