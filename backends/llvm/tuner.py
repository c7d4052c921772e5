"""The tuner: ``cc.compile(..., tune=True)`` and ``cnncompile tune FILE``.

Where the schedule's rules are a guess (the channel block of a tiled row, batch pairs, the
unroll-and-jam block: `schedule.choices`), the tuner times a few candidates per kernel on this
host and keeps the fastest. The program is compiled once per *round*: round k gives every kernel
still to tune its k-th candidate (round 0: the rules), so a network with many kernels costs as
many compiles as its longest candidate list, not one per candidate. Each kernel of the train
phase is timed alone (``run_unit``, as bench/profile_stages.py does), median of REPEATS runs,
interleaved with the other kernels; kernels sharing a fingerprint (repeated blocks) add up.

Rounds start only while they fit in the budget (``tune_seconds``, default TUNE_SECONDS = 30 s
for the whole network, the final compile included: the longest round so far is the estimate).
A kernel whose candidates were all timed gets its choice stored in the disk cache (one
checksummed entry per kernel fingerprint and target, ``.tune``), and every later tuned compile
on this host uses it without timing anything; a kernel the budget left half-timed uses its best
so far and is tuned again next time. A second entry per program lists its kernels' choices, so
that a later tuned compile of it loads the stored program without lowering a stage (any kernel's
entry damaged or replaced: the program is gone through again). An alternative replaces the
rules only when it is faster by MARGIN (5 %: noise on a shared machine is a few percent).
Untuned compiles never read these entries.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import time

import numpy as np

from cnncompile import diskcache
from cnncompile.ir.buffers import PERSISTENT, array_dtype
from cnncompile.ir.expr import concrete_shape

from .codegen import UNITS_PHASE, code_program
from .program import LLVMExecutable
from .schedule.choices import candidates, fingerprint, valid
from .target import Target, resolve

FORMAT = "tune-1"
TUNE_SECONDS = 30.0  # default budget for a whole network
TUNE_BATCH = 32  # examples per timed step
REPEATS = 7  # timed samples per kernel and round (the median counts)
SAMPLE_SECONDS = 0.002  # a sample runs a kernel this long at least (several runs of a small one)
MAX_RUNS = 20
MARGIN = 0.05  # an alternative must beat the rules by 5 %
clock = time.perf_counter  # what times kernels (tests replace it to prove that nothing is timed); the
# budget is kept by time.monotonic


# ----- stored choices ---------------------------------------------------------------------------

def entry_name(fp: str) -> str:
    """The disk cache entry of a kernel's choice (``fp`` already holds the target's key)."""
    return hashlib.sha256(f"{FORMAT}\n{fp}".encode()).hexdigest() + ".tune"


def load_choice(fp: str) -> dict | None:
    """The stored choice of kernel ``fp``, or None: missing, damaged (checksum, format, key) or
    not a valid choice."""
    payload = diskcache.read(entry_name(fp))
    if payload is None:
        return None
    try:
        record = json.loads(payload.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("kernel") != fp:
        return None
    choice = record.get("choice")
    return choice if valid(choice) else None


def store_choice(fp: str, choice: dict, seconds: list) -> None:
    record = {"format": FORMAT, "kernel": fp, "choice": choice, "seconds": seconds}
    diskcache.write(entry_name(fp), json.dumps(record, sort_keys=True).encode())


# ----- what to tune -----------------------------------------------------------------------------

def tunable(code_prog, target: Target, ftype: str) -> dict[str, list[dict]]:
    """Per fingerprint of a train-phase stage with more than one candidate, its candidates."""
    lanes = target.vector_lanes(ftype)
    out: dict[str, list[dict]] = {}
    for _, _, stage in code_prog.phase_stages(UNITS_PHASE):
        fp = fingerprint(stage, code_prog, target, ftype)
        if fp not in out:
            out[fp] = candidates(stage, code_prog, target, lanes)
    return {fp: c for fp, c in out.items() if len(c) > 1}


# ----- timing -----------------------------------------------------------------------------------

def feeds_for(exe: LLVMExecutable, batch: int, rng) -> dict:
    """Inputs for a timed step: random floats, zero class indices, dropout masks of ones."""
    feeds = {}
    for name, spec in exe.prog.tensors.items():
        if spec.role in PERSISTENT or not (spec.role in ("input", "label") or name in exe.prog.noise):
            continue
        shape = concrete_shape(spec.shape, batch)
        dtype = array_dtype(spec, exe.dtype)
        if name in exe.prog.noise:
            feeds[name] = np.ones(shape, dtype)
        elif np.dtype(dtype).kind == "f":
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = np.zeros(shape, dtype)
    return feeds


def units_to_time(exe: LLVMExecutable, fps: set, batch: int, ftype: str) -> list[tuple[int, str, int]]:
    """The train-phase kernels whose main stage has a fingerprint in ``fps``, as (unit, fingerprint,
    runs per sample: enough for about SAMPLE_SECONDS, so that a call's overhead and the clock's
    noise do not swamp a small kernel), after one step and one run of each (warm caches)."""
    exe.run(UNITS_PHASE, batch, feeds_for(exe, batch, np.random.default_rng(0)))
    out = []
    for j, stages in enumerate(exe.units(UNITS_PHASE)):
        fp = fingerprint(stages[0], exe.prog, exe.target, ftype)
        if fp in fps:
            started = clock()
            exe.run_unit(UNITS_PHASE, j, batch)
            once = max(clock() - started, 1e-6)
            out.append((j, fp, max(1, min(MAX_RUNS, int(SAMPLE_SECONDS / once)))))
    return out


def kernel_times(rounds: list, batch: int) -> list[dict[str, float]]:
    """Per round (an executable and its `units_to_time`), seconds per kernel fingerprint: REPEATS
    samples of every kernel of every round, the rounds interleaved (the host's load drifts), the
    median per kernel, summed over kernels sharing a fingerprint."""
    samples = [{j: [] for j, _, _ in units} for _, units in rounds]
    for _ in range(REPEATS):
        for (exe, units), mine in zip(rounds, samples):
            for j, _, runs in units:
                started = clock()
                for _ in range(runs):
                    exe.run_unit(UNITS_PHASE, j, batch)
                mine[j].append((clock() - started) / runs)
    out = []
    for (_, units), mine in zip(rounds, samples):
        times: dict[str, float] = {}
        for j, fp, _ in units:
            times[fp] = times.get(fp, 0.0) + statistics.median(mine[j])
        out.append(times)
    return out


# ----- the tuner --------------------------------------------------------------------------------

class Tuner:
    """Chooses per kernel among `tunable`'s candidates for one program (see the module's doc)."""

    def __init__(self, prog, dtype, target: Target, seconds: float | None = None, batch: int = TUNE_BATCH):
        self.prog, self.dtype, self.target = prog, np.dtype(dtype), target
        self.ftype = "float" if self.dtype == np.float32 else "double"
        self.seconds = TUNE_SECONDS if seconds is None else float(seconds)
        self.batch = batch
        self.report: list[str] = []  # what was chosen and why, for `cnncompile tune`
        self.found: list[str] = []  # the fingerprints of the kernels with candidates

    def choices(self) -> dict[str, dict]:
        """Fingerprint → choice for every tunable kernel: stored ones, then timed ones."""
        started = time.monotonic()
        code = code_program(self.prog, self.ftype, self.target)
        found = tunable(code, self.target, self.ftype)
        self.found = list(found)
        known = {fp: load_choice(fp) for fp in found}
        missing = {fp: cands for fp, cands in found.items() if known[fp] is None}
        self.report.append(f"{len(found)} kernels with candidates, {len(found) - len(missing)} chosen before "
                           f"(stored), {len(missing)} to time")
        chosen = {fp: c for fp, c in known.items() if c is not None}
        if missing:
            chosen.update(self.tune(missing, chosen, self.labels(code), started))
        self.report.append(f"chosen: {sum(1 for c in chosen.values() if c)} of {len(found)} kernels off the rules")
        return chosen

    def labels(self, code) -> dict[str, str]:
        """A readable name per fingerprint (the first stage that has it)."""
        out: dict[str, str] = {}
        for _, _, s in code.phase_stages(UNITS_PHASE):
            fp = fingerprint(s, code, self.target, self.ftype)
            out.setdefault(fp, f"{s.role} {s.layer} {s.out}" + (f" wrt {s.wrt}" if s.wrt else ""))
        return out

    def tune(self, missing: dict, known: dict, labels: dict, started: float) -> dict[str, dict]:
        """Compile the rounds that fit in the budget, time them interleaved, keep per kernel the
        fastest; store every kernel whose candidates were all timed."""
        longest, rounds = 0.0, []
        count = max(len(c) for c in missing.values())
        for k in range(count):
            spent = time.monotonic() - started
            if k and spent + 2 * longest > self.seconds:  # (this round, and the final compile)
                self.report.append(f"budget {self.seconds:.0f} s: compiled {k} of {count} rounds "
                                   f"({spent:.1f} s spent, a round takes {longest:.1f} s)")
                break
            t0 = time.monotonic()
            trial = dict(known)
            trial.update({fp: c[k] for fp, c in missing.items() if k < len(c)})
            exe = LLVMExecutable(self.prog, self.dtype, target=self.target, choices=trial, phases=[UNITS_PHASE])
            fps = {fp for fp, c in missing.items() if k < len(c)}
            rounds.append((exe, units_to_time(exe, fps, self.batch, self.ftype)))
            longest = max(longest, time.monotonic() - t0)
        times: dict[str, list] = {fp: [] for fp in missing}
        for per_round in kernel_times(rounds, self.batch) if len(rounds) > 1 else []:
            for fp, seconds in per_round.items():
                times[fp].append(seconds)
        out = {}
        for fp, cands in missing.items():
            timed = times[fp]
            if not timed:  # (no alternative timed, or not a kernel's main: fused into another's epilogue)
                continue
            best = min(range(len(timed)), key=timed.__getitem__)
            if timed[best] > timed[0] * (1 - MARGIN):
                best = 0
            out[fp] = cands[best]
            whole = len(timed) == len(cands)
            if whole:
                store_choice(fp, cands[best], timed)
            self.report.append(f"{labels.get(fp, fp[:12])}: {describe(cands[best])} ("
                               + ", ".join(f"{describe(c)} {t * 1e3:.3f} ms" for c, t in zip(cands, timed))
                               + (")" if whole else "; budget ran out: not stored)"))
        return out


def describe(choice: dict) -> str:
    return "rules" if not choice else " ".join(f"{k}={v}" for k, v in sorted(choice.items()))


def index_name(program_key: str) -> str:
    """The entry listing a program's tuned kernels and their choices (see `tuned_executable`)."""
    return hashlib.sha256(f"{FORMAT} index\n{program_key}".encode()).hexdigest() + ".tune"


def load_index(program_key: str) -> dict | None:
    """The choices a tuned compile of this program used, if every one of them is still the
    kernel's stored choice (a kernel's entry damaged or replaced: None, and the program is
    tuned through again)."""
    payload = diskcache.read(index_name(program_key))
    try:
        record = json.loads(payload.decode()) if payload is not None else None
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("program") != program_key \
            or not isinstance(record.get("kernels"), dict):
        return None
    kernels = record["kernels"]
    if not all(valid(c) and load_choice(fp) == c for fp, c in kernels.items()):
        return None
    return {fp: c for fp, c in kernels.items() if c}


def store_index(program_key: str, fps) -> None:
    """Record each tunable kernel's (``fps``) stored choice for this program, when every one has one."""
    kernels = {fp: load_choice(fp) for fp in fps}
    if all(c is not None for c in kernels.values()):
        record = {"format": FORMAT, "program": program_key, "kernels": kernels}
        diskcache.write(index_name(program_key), json.dumps(record, sort_keys=True).encode())


def tuned_executable(program_key: str, program, dtype, target, seconds: float | None, key_for, store) -> tuple:
    """The executable of a program with the tuner's choices: (program, executable, report, warm).
    ``program_key``: the untuned program's cache key; ``program()``: the program (derived only
    if needed); ``key_for(options)``: the program cache's key for these codegen options;
    ``store(name, prog, executable)``: cache it. A program tuned before, whose kernels' stored
    choices are unchanged, is loaded with nothing lowered or timed."""
    from cnncompile import program_cache

    target = resolve(target)
    choices = load_index(program_key)
    if choices is not None:
        entry = program_cache.load(key_for(LLVMExecutable.codegen_options(target, choices)))
        if entry is not None:
            return entry["prog"], LLVMExecutable(entry["prog"], dtype, manifest=entry["manifest"], target=target,
                                                 choices=choices), [f"{len(choices)} kernels off the rules, "
                                                                    f"as stored (nothing timed)"], True
    prog = program()
    tuner = Tuner(prog, dtype, target, seconds)
    choices = {fp: c for fp, c in tuner.choices().items() if c}  # (the rules' {} as in `load_index`)
    name = key_for(LLVMExecutable.codegen_options(target, choices))
    entry = program_cache.load(name)
    if entry is not None:
        executable = LLVMExecutable(entry["prog"], dtype, manifest=entry["manifest"], target=target, choices=choices)
        prog = entry["prog"]
    else:
        executable = LLVMExecutable(prog, dtype, target=target, choices=choices)
        store(name, prog, executable)
    store_index(program_key, tuner.found)
    return prog, executable, tuner.report, entry is not None
