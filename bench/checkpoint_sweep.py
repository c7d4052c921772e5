"""Damage sweep of a checkpoint: every bit of every structure byte (zip local headers, central
directory, end record and comment, .npy headers) flipped, and every truncation length, each
written to a file and loaded with ``cc.load(path, net=net)``. Prints how many loaded exactly the
saved model, loaded something else (silent damage), raised CheckpointError, or raised anything
else. Run: ``python bench/checkpoint_sweep.py [--net tiny|lenet5] [--payload-step N] [--truncate-step N]``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import cnncompile as cc  # noqa: E402
from cnncompile import nn  # noqa: E402
from test_checkpoint_damage import flipped, structure_offsets, tiny_net  # noqa: E402


def lenet5():
    return nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84),
                         nn.ReLU(), nn.Linear(84, 10))


NETS = {"tiny": (tiny_net, (1, 6, 6), 3), "lenet5": (lenet5, (1, 32, 32), 10)}


def fingerprint(model) -> tuple:
    """Everything a load restores: state arrays (parameters, buffers, optimizer), counters, the
    learning rate, the history and the callbacks' states."""
    arrays = {n: model.executable.state[n].tobytes() for n, spec in model.prog.tensors.items()
              if spec.role in ("param", "buffer", "state")}
    counters = (model.step, model.epoch, model.noise_seed, model.noise_draws, model.batches_tracked,
                model.optimizer.lr if model.optimizer else None)
    extra = json.dumps([model.history, model.pending_callback_states], sort_keys=True, default=repr)
    return tuple(sorted(arrays.items())), counters, extra


def trained(name: str, path: Path):
    make, shape, classes = NETS[name]
    model = cc.compile(make(), shape, loss=nn.CrossEntropyLoss(), optimizer=cc.optim.SGD(lr=0.05, momentum=0.9),
                       backend="numpy", seed=1)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, *shape)).astype(np.float32), rng.integers(0, classes, 32)
    model.fit((x, y), epochs=2, batch_size=8, validation=(x[:8], y[:8]), verbose=False,
              callbacks=[cc.callbacks.StepLR(1, 0.5),
                         cc.callbacks.EarlyStopping(patience=5, restore_best_weights=True)])
    model.save(path)
    return make


def outcome(path: Path, make, original) -> str:
    try:
        model = cc.load(path, net=make())
    except cc.CheckpointError:
        return "CheckpointError"
    except Exception as exc:  # noqa: BLE001 - counted by kind
        return f"other {type(exc).__name__}"
    return "loaded, identical" if fingerprint(model) == original else "SILENT (loaded, different)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--net", choices=sorted(NETS), default="tiny")
    parser.add_argument("--payload-step", type=int, default=0,
                        help="also flip bit 0 of every N-th payload byte (0: none)")
    parser.add_argument("--truncate-step", type=int, default=1,
                        help="try every N-th truncation length (1: all; LeNet-5's file has ~0.5M)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        good, bad = Path(tmp) / "good.ckpt", Path(tmp) / "bad.ckpt"
        make = trained(args.net, good)
        original = fingerprint(cc.load(good, net=make()))
        data = good.read_bytes()
        offsets = structure_offsets(data)
        cases = [(f"flip {o}.{b}", lambda o=o, b=b: flipped(data, o, b)) for o in offsets for b in range(8)]
        if args.payload_step:
            payload = sorted(set(range(len(data))) - set(offsets))[::args.payload_step]
            cases += [(f"payload {o}.0", lambda o=o: flipped(data, o, 0)) for o in payload]
        cases += [(f"truncate {n}", lambda n=n: data[:n]) for n in range(0, len(data), args.truncate_step)]
        print(f"{args.net}: checkpoint of {len(data)} bytes, {len(offsets)} structure bytes; "
              f"{len(cases)} damaged files", flush=True)
        counts: Counter = Counter()
        examples: dict[str, str] = {}
        started = time.perf_counter()
        for label, damaged in cases:
            bad.write_bytes(damaged())
            result = outcome(bad, make, original)
            counts[(label.split()[0], result)] += 1
            examples.setdefault(result, label)
            os.remove(bad)
    print(f"{time.perf_counter() - started:.0f}s")
    for (kind, result), n in sorted(counts.items()):
        print(f"{kind:9s} {result:28s} {n:7d}   (e.g. {examples[result]})")
    totals: Counter = Counter()
    for (_, result), n in counts.items():
        totals[result] += n
    print("total:", dict(totals))
    silent = totals["SILENT (loaded, different)"] + sum(n for r, n in totals.items() if r.startswith("other"))
    sys.exit(1 if silent else 0)


if __name__ == "__main__":
    main()
