"""The machine the LLVM backend writes code for: vector width, registers, FMA units, caches.

Every template, block size and register budget of the schedule (`backends/llvm/schedule/`) and
every vector the code generator writes is computed from a `Target`; no lane or register count is
written anywhere else. The host's target is detected once, from LLVM's name and feature list for
the host CPU and from the cache sizes Linux reports; ``CNNCOMPILE_TARGET`` or
``cc.compile(..., target=...)`` picks another:

- ``avx2``: 8 float32 lanes, 16 registers (ymm), the host's features with 512-bit vectors off;
- ``avx512``: 16 lanes, 32 registers (zmm). On a host without AVX-512 the same 16-lane schedule
  is compiled with the host's own features (LLVM splits each 16-lane vector into two 8-lane
  halves): the templates' logic runs and can be tested, never an instruction the host lacks;
- ``host``: the detected one. The rule is ``avx512`` where the CPU has two full-width 512-bit FMA
  units (Intel's server cores, Zen 5), else ``avx2`` (Zen 4 runs 512-bit FMAs double-pumped: its
  512-bit code ran no faster, see the README). Timed on an Emerald Rapids Xeon (two threads),
  the 16-lane schedule ran ResNet-20's train step in 54 ms against 71 ms for 8 lanes and LeNet-5's
  1.2× faster, so ``WIDE_BY_DEFAULT`` lets detection choose it there.

The target is part of the program cache's key and of every object-code key: code made for one
target is never loaded for another.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from cnncompile.ir.errors import CompileError

NAMES = ("host", "avx2", "avx512")
WIDE_FEATURES = ("evex512", "avx10.1-512")  # besides every avx512*: what lets LLVM write zmm code
# CPUs with two 512-bit FMA units per core (where 512-bit vectors pay: twice the FLOPs per cycle)
TWO_WIDE_FMA = ("skylake-avx512", "cascadelake", "cooperlake", "icelake-server", "sapphirerapids",
                "emeraldrapids", "graniterapids", "graniterapids-d", "diamondrapids", "znver5")
CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")
# Whether detection may choose 512-bit code on TWO_WIDE_FMA hosts (measured to pay there: see above).
WIDE_BY_DEFAULT = True


@dataclass(frozen=True)
class Target:
    """What the code is written for. ``lanes``: float32 values per vector register (float64:
    half); ``registers``: vector registers; ``fma_units``: FMA pipes per core at that width;
    ``l1``/``l2``: data cache bytes per core; ``cpu``/``features``: what LLVM compiles for
    (LLVM's CPU name, its ``+feature,-feature`` string); ``note``: anything the user should know
    (a 16-lane schedule on a host without AVX-512); ``masked_tails``: a row's last, partial vector
    is stored with one masked store (AVX-512's mask registers) instead of pieces of halving width.
    Off on every target: timed on an Emerald Rapids Xeon (`bench/targets.py`, two threads) it
    ran ResNet-20's step in 52.4 ms against 51.2 ms and LeNet-5's in 2.82 against 2.76 ms; on
    AVX2 hosts a masked store costs ~16 cycles. Kept as an option (tests run it both ways)."""

    name: str
    lanes: int
    registers: int
    fma_units: int
    l1: int
    l2: int
    cpu: str
    features: str
    note: str = ""
    masked_tails: bool = False  # a row's tail stored by one masked store (an option; see above)

    # ----- what the schedule and the templates are computed from --------------------------------
    def vector_lanes(self, ftype: str) -> int:
        """Elements of ``ftype`` ("float" or "double") per vector register."""
        return self.lanes if ftype == "float" else self.lanes // 2

    @property
    def accumulators(self) -> int:
        """Vector accumulators of a register tile: half the registers (the rest hold loads and
        broadcasts)."""
        return self.registers // 2

    @property
    def wide_accumulators(self) -> int:
        """Accumulators of templates whose loads are one vector per chunk and one broadcast (a
        lanes row, a blocked reduction row): three quarters of the registers."""
        return self.registers * 3 // 4

    @property
    def max_row(self) -> int:
        """The longest output row held in registers, in elements: a float32 vector per accumulator."""
        return self.lanes * self.accumulators

    @property
    def siblings(self) -> int:
        """Sums in one loop nest, one vector accumulator each (more chains spill, and gain little)."""
        return self.registers // 4

    @property
    def chains(self) -> int:
        """Independent FMA chains that hide an FMA's latency: two per FMA unit."""
        return 2 * self.fma_units

    def jam_sizes(self) -> tuple[int, ...]:
        """Unroll-and-jam blocks of plain loops, largest first: powers of two up to a tile's
        accumulators."""
        sizes, size = [], self.accumulators
        while size >= 2:
            sizes.append(size)
            size //= 2
        return tuple(sizes)

    @property
    def split(self) -> bool:
        """16-lane code compiled for a host without AVX-512 (each vector run as two halves)."""
        return self.lanes == 16 and "+avx512f" not in self.features.split(",")

    # ----- identity -----------------------------------------------------------------------------
    def key(self) -> str:
        """Everything about the target that the generated code depends on (cache keys)."""
        return repr((self.name, self.lanes, self.registers, self.fma_units, self.l1, self.l2, self.cpu,
                     self.features, self.masked_tails))

    def describe(self) -> str:
        text = (f"{self.name}: {self.lanes} float32 lanes, {self.registers} vector registers, {self.fma_units} FMA "
                f"units, L1d {self.l1 // 1024} KiB, L2 {self.l2 // 1024} KiB; compiled for {self.cpu}")
        return text + (f" ({self.note})" if self.note else "")


# ----- the host ---------------------------------------------------------------------------------

def host_cpu() -> tuple[str, dict]:
    """LLVM's name for the host CPU and its feature map (name → enabled)."""
    import llvmlite.binding as llvm
    llvm.initialize_native_target()
    return llvm.get_host_cpu_name(), dict(llvm.get_host_cpu_features())


def flatten(features: dict) -> str:
    return ",".join(("+" if on else "-") + name for name, on in sorted(features.items()))


def wide(name: str) -> bool:
    return name.startswith("avx512") or name in WIDE_FEATURES


def narrow_features(features: dict) -> dict:
    """The features with 512-bit vectors off."""
    return {k: (False if wide(k) else v) for k, v in features.items()}


def cache_sizes(root: Path = CACHE_DIR) -> tuple[int, int]:
    """The L1 data and L2 cache of cpu0 in bytes, from Linux's sysfs; 32 KiB and 1 MiB where it
    says nothing."""
    sizes = {}
    try:
        for index in root.glob("index*"):
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 1024, "M": 1024 ** 2}.get(text[-1:], 1)
            if kind in ("Data", "Unified"):
                sizes.setdefault(level, int(text.rstrip("KM")) * scale)
    except (OSError, ValueError):
        sizes = {}
    return sizes.get(1, 32 * 1024), sizes.get(2, 1024 * 1024)


def make(name: str, cpu: str, features: dict, l1: int, l2: int) -> Target:
    """The target ``name`` ("avx2" or "avx512") on a host with ``cpu`` and ``features``."""
    has512 = bool(features.get("avx512f"))
    fma = 2 if features.get("fma") or has512 else 1
    if name == "avx2":
        return Target("avx2", 8, 16, fma, l1, l2, cpu, flatten(narrow_features(features)))
    if name != "avx512":
        raise CompileError(f"unknown target {name!r}: choose one of {', '.join(NAMES)}")
    if has512:
        return Target("avx512", 16, 32, 2 if cpu in TWO_WIDE_FMA else 1, l1, l2, cpu, flatten(features))
    return Target("avx512", 16, 32, fma, l1, l2, cpu, flatten(narrow_features(features)),
                  note=f"no AVX-512 on this {cpu}: compiled with its own features, each 16-lane vector as two "
                       f"8-lane halves")


@functools.lru_cache(maxsize=None)
def named(name: str) -> Target:
    """The target ``name`` on this host (``host``: the detected one)."""
    cpu, features = host_cpu()
    l1, l2 = cache_sizes()
    return make(detected_name(cpu, features) if name == "host" else name, cpu, features, l1, l2)


def detected_name(cpu: str, features: dict, wide_by_default: bool | None = None) -> str:
    """The host's default: 512-bit vectors where the CPU has AVX-512 and two full-width FMA units
    (not Zen 4's double-pumped ones, nor client cores' single one) and ``WIDE_BY_DEFAULT`` allows
    it, else 256-bit."""
    wide_by_default = WIDE_BY_DEFAULT if wide_by_default is None else wide_by_default
    return "avx512" if wide_by_default and features.get("avx512f") and cpu in TWO_WIDE_FMA else "avx2"


def host() -> Target:
    """The detected target of this host (what runs without an override)."""
    return named("host")


def resolve(target: str | Target | None = None) -> Target:
    """``target`` as a `Target`: one given, a name, or (None) ``CNNCOMPILE_TARGET``'s name, else
    the host's. A 16-lane target on a host without AVX-512 warns once that it runs split."""
    if isinstance(target, Target):
        return target
    name = target if target is not None else os.environ.get("CNNCOMPILE_TARGET", "host")
    if not isinstance(name, str) or name.lower() not in NAMES:
        where = "target=" if target is not None else "CNNCOMPILE_TARGET="
        raise CompileError(f"{where}{name!r} is not a target: choose one of {', '.join(NAMES)} "
                           f"(or pass a cnncompile.backends.llvm.target.Target)")
    found = named(name.lower())
    if found.note:
        warn_once(found)
    if os.environ.get("CNNCOMPILE_AVX512") == "1" and found.name == "avx2":  # (as before there were targets:
        found = replace(found, features=flatten(host_cpu()[1]))  # 8-lane templates, LLVM free to use zmm)
    return found


@functools.lru_cache(maxsize=None)
def warn_once(target: Target) -> None:
    warnings.warn(f"cnncompile target {target.describe()}", RuntimeWarning, stacklevel=3)
