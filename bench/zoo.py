"""Training throughput of the example networks: cnncompile against PyTorch eager, torch.compile, JAX
(the whole SGD step under one ``jax.jit``) and tinygrad (the step under ``TinyJit``), all from the
same initial weights, batch and SGD hyper-parameters: ResNet-20 (batch 32), the MobileNet-style net,
the small DenseNet, AlexNet (batch 8) and LeNet-5 (batch 64).

Each framework runs in a process of its own (bench/peers/worker.py; thread pools of several
frameworks in one process starve each other) and the rounds alternate between them, the order
turning each round; ``--pause`` waits between one framework's round and the next, so that no
idle threads are still spinning when the next starts (report both ways). Before any timing each
framework's first loss must equal cnncompile's within the float32 bound (1e-5 of the loss), and the
second within that plus 1e-3 of the change the first update made, or the bench stops: the
frameworks run the same computation (see check_losses). Networks with dropout (MobileNet, AlexNet) cannot be
compared that way: each framework draws its own masks.

Per net: images/s medians, the ratio to PyTorch eager measured in the same run, the compile time
(cc.compile; the first step for torch.compile and JAX; the first two for tinygrad, whose TinyJit
captures on the second; cnncompile's, inductor's and tinygrad's disk caches may keep part of it from
an earlier run), each process's peak RSS, and cnncompile's training GFLOP/s (bench/flops.py)
and its share of this machine's sgemm ceiling (bench/sgemm.py). A framework that is not installed
shows so in its row.

    pip install -e '.[bench]'      # jax[cpu], tinygrad (tinygrad's CPU device also wants clang, and
                                   # libLLVM >= 16 for its LLVM renderer)
    python bench/zoo.py [--nets lenet5 resnet20] [--rounds 5] [--steps 5] [--pause 0.05]
                        [--frameworks cnncompile eager torch.compile jax tinygrad]
    python bench/zoo.py --nets resnet20 --frameworks eager cnncompile@avx512   # both vector widths
    python bench/zoo.py --nets lenet5 --frameworks eager tinygrad@CPU:CLANG tinygrad@CPU:LLVM tinygrad@CPU:X86
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "peers" / "worker.py"
NETS = {"lenet5": 64, "resnet20": 32, "mobilenet": 32, "densenet": 32, "alexnet": 8}
FRAMEWORKS = ["cnncompile", "eager", "torch.compile", "jax", "tinygrad"]
THREADS = 2
LOSS_BOUND = 1e-5  # of the loss's scale: the project's float32 bound, for the first loss
UPDATE_BOUND = 1e-3  # of the first update's change of the loss, added for the second (check_losses)


class BenchError(SystemExit):
    """The frameworks disagree (or cnncompile, the reference, failed): no timing means anything."""


class Worker:
    """One framework's process; ``ready`` is its first answer (losses, compile time) or its error."""

    def __init__(self, framework, net, state, batch, logs: Path, check_steps=2):
        self.framework = framework
        self.log = logs / f"{net}-{framework.replace(':', '_').replace('@', '_')}.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), framework, net, str(state), "--batch", str(batch),
                 "--check-steps", str(check_steps)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        self.ready = self.answer()
        self.seconds, self.rss = [], 0.0

    def answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            return {"ok": False, "missing": False, "error": f"worker died:\n{self.log_tail()}"}
        return json.loads(line)

    def log_tail(self, lines=8) -> str:
        return "\n".join(self.log.read_text().strip().splitlines()[-lines:]) or "(no output)"

    def time(self, steps: int) -> None:
        self.proc.stdin.write(f"time {steps}\n")
        reply = self.answer()
        if "seconds" not in reply:
            raise BenchError(f"{self.framework}: {reply.get('error')}\n{self.log_tail()}")
        self.seconds.append(reply["seconds"])
        self.rss = reply["peak_rss_mib"]

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        self.proc.wait()


def check_losses(net: str, reference: Worker, other: Worker) -> tuple[float, float]:
    """BenchError unless ``other`` computes what cnncompile computes. The first loss is a function of
    the shared weights and batch alone: within LOSS_BOUND of max(1, |loss|). The second checks the
    update (learning rate, momentum, weight decay): within that bound plus UPDATE_BOUND of the change
    the update made to cnncompile's loss. No later loss is compared: at a learning rate of 0.1 the
    float32 rounding of the first update grows by orders of magnitude each step (torch.compile's
    third ResNet-20 loss is 4e-3 from eager's and cnncompile's). Returns each difference as a
    fraction of its bound."""
    ref, got = reference.ready["losses"], other.ready["losses"]
    if len(ref) < 2 or len(got) < 2:
        raise BenchError(f"{net}: two losses wanted, cnncompile gave {ref}, {other.framework} {got}")
    bounds = [LOSS_BOUND * max(1.0, abs(ref[0])),
              LOSS_BOUND * max(1.0, abs(ref[1])) + UPDATE_BOUND * abs(ref[1] - ref[0])]
    used = [abs(g - r) / b for g, r, b in zip(got, ref, bounds)]
    if not max(used) <= 1:
        raise BenchError(f"{net}: {other.framework}'s losses {got[:2]} differ from cnncompile's {ref[:2]} by "
                         f"{used[0]:.2g} and {used[1]:.2g} of their bounds ({bounds[0]:.1e}, {bounds[1]:.1e}: "
                         f"{LOSS_BOUND:g} of the loss, the second plus {UPDATE_BOUND:g} of the first update's "
                         f"change): not the same network, weights, batch or optimizer; see bench/peers/")
    return used[0], used[1]


def start_workers(name, args, logs: Path):
    """cnncompile first (it writes the shared weights, batch and hyper-parameters), then the rest."""
    state = logs / f"{name}.npz"
    reference = Worker("cnncompile", name, state, NETS[name], logs)
    if not reference.ready["ok"]:
        reference.close()
        raise BenchError(f"{name}: cnncompile failed: {reference.ready['error']}\n{reference.log_tail()}")
    workers = [reference]
    for framework in args.frameworks:
        if framework != "cnncompile":
            workers.append(Worker(framework, name, state, NETS[name], logs))
    return workers


def run_rounds(workers, args) -> None:
    """Each round times every framework once, in an order that turns by one each round."""
    for r in range(args.rounds):
        for k in range(len(workers)):
            workers[(r + k) % len(workers)].time(args.steps)
            if args.pause:
                time.sleep(args.pause)


def report(name, workers, ceiling, note) -> None:
    batch = NETS[name]
    ran = [w for w in workers if w.ready["ok"]]
    speed = {w.framework: batch / statistics.median(w.seconds) for w in ran}
    eager = speed.get("eager")
    print(f"\n{name}, batch {batch}: {note}")
    print(f"  {'framework':22s} {'images/s':>10s} {'vs eager':>9s} {'compile s':>10s}  {'peak RSS':>9s}  version")
    for w in workers:
        r = w.ready
        if not r["ok"]:
            print(f"  {w.framework:22s} {'not installed' if r.get('missing') else 'failed'}: {r['error']}")
            continue
        ratio = f"×{speed[w.framework] / eager:.2f}" if eager else "-"
        print(f"  {w.framework:22s} {speed[w.framework]:10,.0f} {ratio:>9s} {r['compile_s']:10.1f}  "
              f"{w.rss:6,.0f} MiB  {r['info'].get('version', '')} (compile: {r['compile_what']})")
    for w in ran:
        if w.framework.split("@")[0] == "cnncompile":  # (the reference, and any cnncompile@TARGET)
            info = w.ready["info"]
            gflops = info["train_flop"] * speed[w.framework] / batch / 1e9
            share = f" = {100 * gflops / ceiling:.1f}% of the sgemm ceiling" if ceiling else ""
            print(f"  {w.framework} ({info['backend']} backend): {gflops:.1f} GFLOP/s{share}; {info['memory']}",
                  flush=True)


def bench_net(name, args, ceiling, logs: Path) -> None:
    workers = start_workers(name, args, logs)
    try:
        dropout = workers[0].ready["info"]["dropout"]
        if dropout:
            note = f"losses not compared (dropout in {', '.join(dropout)}: the draws differ)"
        else:
            used = [check_losses(name, workers[0], w) for w in workers[1:] if w.ready["ok"]] or [(0.0, 0.0)]
            note = (f"first two losses equal to cnncompile's, differences at most {max(u[0] for u in used):.0%} "
                    f"and {max(u[1] for u in used):.0%} of their bounds")
        run_rounds([w for w in workers if w.ready["ok"]], args)
        report(name, workers, ceiling, f"{note}; medians of {args.rounds} rounds × {args.steps} steps, "
               f"one process per framework{f', {args.pause:g} s pause between them' if args.pause else ''}")
    finally:
        for w in workers:
            w.close()


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--frameworks", nargs="+", default=FRAMEWORKS,
                        help="cnncompile always runs (the reference, for the default target); cnncompile@TARGET "
                             "adds the same network compiled for TARGET (avx2, avx512); tinygrad@DEV picks "
                             "tinygrad's device")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between two frameworks' rounds")
    parser.add_argument("--no-ceiling", action="store_true", help="skip measuring the sgemm ceiling")
    args = parser.parse_args(argv)
    ceiling = None
    if not args.no_ceiling:
        from sgemm import sgemm_ceiling  # torch's matmul here, before any worker starts
        ceiling = sgemm_ceiling(THREADS)
    print(f"{cpu_name()}; sgemm ceiling on {THREADS} threads: "
          f"{f'{ceiling:.1f} GFLOP/s' if ceiling else 'not measured'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cnncompile-zoo-") as logs:
        for name in args.nets:
            bench_net(name, args, ceiling, Path(logs))


if __name__ == "__main__":
    main()
