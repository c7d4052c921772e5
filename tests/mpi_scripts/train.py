"""A small training run for the distributed tests: the same script runs as one plain process
(the reference) or under ``mpirun -n 2`` (data-parallel); rank 0 writes the final state.

python train.py CASE OUT.npz [--epochs E] [--checkpoint P] [--resume P] [--fail raise|kill]
                 [--overlap BUCKET_MB]
"""
import argparse
import os
import signal
import sys

import numpy as np

import cnncompile as cc
from cnncompile import nn
from cnncompile.distributed import MPIOptions, launched_size

N, BATCH, SHAPE = 37, 8, (1, 12, 12)  # 5 steps an epoch, the last one 5 examples (uneven over 2 ranks)


def network(case: str):
    layers = [nn.Conv2d(1, 4, 3)]
    if case in ("bn", "sync_bn"):
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
    if case == "dropout":
        layers.append(nn.Dropout(0.3))
    hidden = 12 if case == "mismatch" and launched_size() > 1 and os.environ.get("OMPI_COMM_WORLD_RANK") == "1" else 16
    return nn.Sequential(*layers, nn.Linear(4 * 5 * 5, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def optimizer(case: str):
    return cc.optim.Adam(1e-2) if case == "adam" else \
        cc.optim.SGD(0.1) if case == "bn" else cc.optim.SGD(0.05, momentum=0.9, weight_decay=5e-4)


def data(case: str = ""):
    rng = np.random.default_rng(0)
    n = 33 if case == "last_one" else N  # "last_one": the last batch holds one example (rank 0 gets none)
    x, y = rng.standard_normal((n, *SHAPE)).astype(np.float32), rng.integers(0, 10, n)
    if case == "other_data" and os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
        return x[:-1], y[:-1]
    return x, y


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("case")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--checkpoint")
    parser.add_argument("--resume")
    parser.add_argument("--fail", choices=["raise", "kill"])
    parser.add_argument("--overlap", type=float, help="overlap the sums with the backward, buckets of this many MB")
    args = parser.parse_args()
    distributed = None if launched_size() <= 1 else \
        MPIOptions(overlap=True, bucket_mb=args.overlap) if args.overlap else "mpi"
    net = network(args.case)
    if args.resume:
        model = cc.load(args.resume, net=net)
        if distributed:
            from cnncompile.distributed import distribute
            distribute(model, distributed)
    else:
        model = cc.compile(net, SHAPE, nn.CrossEntropyLoss(), optimizer(args.case), seed=3, distributed=distributed,
                           sync_batchnorm=args.case == "sync_bn" and distributed is not None)
    x, y = data(args.case)
    losses = []
    if args.fail or args.case == "train_step":
        for step in range(20 if args.fail else 5):
            if args.fail and step == 3 and model.distributed.rank == 1:
                if args.fail == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("a failure on rank 1 at step 3")
            rows = slice(step * BATCH, step * BATCH + BATCH - step % 2)  # every rank holds the global batch
            losses.append(model.train_step(x[rows], y[rows]))
    else:
        callbacks = [cc.callbacks.ModelCheckpoint(args.checkpoint)] if args.checkpoint else []
        augment = cc.Augment(rotation=15, translation=2, hflip=True) if args.case == "augment" else None
        model.fit((x, y), epochs=args.epochs - model.epoch, batch_size=BATCH, seed=1, augment=augment,
                  callbacks=callbacks, verbose=False)
    rank = model.distributed.rank if model.distributed else 0
    if rank == 0:
        state = {f"state/{k}": v for k, v in model.state_dict().items()}
        extra = {"buckets": len(model.distributed.buckets)} if args.overlap and model.distributed else {}
        np.savez(args.out, loss=np.array(model.history.get("loss", losses)), step=model.step, **state, **extra)
    print(f"rank {rank} done", file=sys.stderr)


if __name__ == "__main__":
    main()
