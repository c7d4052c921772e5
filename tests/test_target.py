"""The code generator's Target: detected from the host, overridden by CNNCOMPILE_TARGET or
cc.compile(target=...), part of every cache key, and driving the schedule; the LLVM backend
matches NumPy under the 8-lane (avx2) and the 16-lane (avx512) targets, every working buffer
poisoned with NaN first (on a host without AVX-512 the 16-lane code runs as 8-lane halves)."""
import dataclasses
import warnings

import llvmlite.binding as llvm
import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn
from cnncompile.backends.llvm import jit
from cnncompile.backends.llvm import target as tg
from cnncompile.backends.llvm.codegen import ModuleWriter, code_program
from cnncompile.backends.llvm.program import LLVMExecutable
from cnncompile.backends.llvm.schedule import Scheduler
from test_llvm import NETS, every_buffer_matches, poison, train_alike

TARGETS = ("avx2", "avx512")
pytestmark = pytest.mark.filterwarnings("ignore:cnncompile target avx512:RuntimeWarning")  # (split 16-lane code)


def enabled(features: str) -> set[str]:
    return {f[1:] for f in features.split(",") if f.startswith("+")}


def host_enabled() -> set[str]:
    return {k for k, v in llvm.get_host_cpu_features().items() if v}


# ----- detection and override -------------------------------------------------------------------

def test_host_target_is_detected_from_the_cpu():
    host = tg.host()
    assert host.cpu == llvm.get_host_cpu_name()
    assert host.name == tg.detected_name(host.cpu, dict(llvm.get_host_cpu_features()))
    assert (host.lanes, host.registers) == ((16, 32) if host.name == "avx512" else (8, 16))
    assert host.l1 > 0 and host.l2 > host.l1 and host.fma_units >= 1


@pytest.mark.parametrize("name", TARGETS + ("host",))
def test_no_target_enables_a_feature_the_host_lacks(name):
    assert enabled(tg.named(name).features) <= host_enabled()


def test_detection_rule_keeps_256_bits_where_512_does_not_pay():
    with_512 = {"avx2": True, "fma": True, "avx512f": True}
    assert tg.detected_name("sapphirerapids", with_512, True) == "avx512"  # two 512-bit FMA units
    assert tg.detected_name("znver4", with_512, True) == "avx2"  # double-pumped
    assert tg.detected_name("tigerlake", with_512, True) == "avx2"  # one 512-bit FMA unit
    assert tg.detected_name("znver3", {"avx2": True, "fma": True}, True) == "avx2"
    # the default rule (timed: 16 lanes pay on Sapphire Rapids); off, 256 bits everywhere
    assert tg.WIDE_BY_DEFAULT and tg.detected_name("sapphirerapids", with_512) == "avx512"
    assert tg.detected_name("sapphirerapids", with_512, False) == "avx2"


def test_avx512_without_avx512_keeps_16_lanes_and_the_hosts_features():
    features = {"avx": True, "avx2": True, "fma": True, "avx512f": False, "evex512": False}
    split = tg.make("avx512", "znver3", features, 32768, 524288)
    assert (split.lanes, split.registers) == (16, 32)
    assert "avx512f" not in enabled(split.features) and "avx2" in enabled(split.features)
    assert "no AVX-512" in split.describe()
    real = tg.make("avx512", "sapphirerapids", dict(features, avx512f=True, evex512=True), 49152, 2 << 20)
    assert {"avx512f", "evex512"} <= enabled(real.features) and not real.note and real.fma_units == 2
    narrow = tg.make("avx2", "sapphirerapids", dict(features, avx512f=True, evex512=True), 49152, 2 << 20)
    assert not {"avx512f", "evex512"} & enabled(narrow.features) and narrow.lanes == 8


def test_cache_sizes_from_sysfs(tmp_path):
    for index, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"),
                                                 (2, "Unified", "2048K"), (3, "Unified", "32M")]):
        d = tmp_path / f"index{index}"
        d.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (d / name).write_text(f"{value}\n")
    assert tg.cache_sizes(tmp_path) == (48 * 1024, 2048 * 1024)
    assert tg.cache_sizes(tmp_path / "missing") == (32 * 1024, 1024 * 1024)


def test_environment_and_argument_override(monkeypatch):
    monkeypatch.setenv("CNNCOMPILE_TARGET", "avx512")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert tg.resolve().lanes == 16
        assert tg.resolve("avx2").lanes == 8  # an argument wins over the environment
        monkeypatch.setenv("CNNCOMPILE_TARGET", "AVX2")
        assert tg.resolve().name == "avx2"
        assert tg.resolve(tg.named("avx512")) is tg.named("avx512")
    monkeypatch.setenv("CNNCOMPILE_TARGET", "avx1024")
    with pytest.raises(cc.CompileError, match=r"CNNCOMPILE_TARGET='avx1024' is not a target.*avx2"):
        tg.resolve()
    with pytest.raises(cc.CompileError, match=r"target='sse' is not a target"):
        cc.compile(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), input_shape=(4,), target="sse")


def test_a_16_lane_target_on_a_host_without_avx512_warns_that_it_runs_split():
    if llvm.get_host_cpu_features().get("avx512f"):
        assert not tg.named("avx512").note
        return
    tg.warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="no AVX-512 on this .*8-lane halves"):
        tg.resolve("avx512")


def test_bounds_checked_16_lane_code_needs_a_host_with_avx512(monkeypatch):
    """Split onto AVX2, LLVM miscompiled the checks of 16-lane code (a filter gradient and batch
    norm's sums came out wrong); such a build is refused, naming what to do instead. Natively
    (an AVX-512 host) it runs, and matches the plain build."""
    monkeypatch.setenv("CNNCOMPILE_CHECK", "1")
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if tg.named("avx512").split:
            with pytest.raises(cc.CompileError, match=r"no AVX-512.*CNNCOMPILE_TARGET=avx2"):
                cc.compile(net, input_shape=(1, 7, 7), loss=nn.CrossEntropyLoss(), target="avx512")
            return
        checked = cc.compile(net, input_shape=(1, 7, 7), loss=nn.CrossEntropyLoss(), target="avx512")
    monkeypatch.delenv("CNNCOMPILE_CHECK")
    plain = cc.compile(net, input_shape=(1, 7, 7), loss=nn.CrossEntropyLoss(), target="avx512")
    x, y = np.random.default_rng(0).standard_normal((5, 1, 7, 7)), np.arange(5) % 3
    assert checked.executable.checked and checked.train_step(x, y) == pytest.approx(plain.train_step(x, y), rel=1e-5)


def test_budgets_follow_the_registers():
    narrow, wide = tg.named("avx2"), tg.named("avx512")
    assert (narrow.accumulators, narrow.wide_accumulators, narrow.max_row, narrow.siblings) == (8, 12, 64, 4)
    assert (wide.accumulators, wide.wide_accumulators, wide.max_row, wide.siblings) == (16, 24, 256, 8)
    assert narrow.jam_sizes() == (8, 4, 2) and wide.jam_sizes() == (16, 8, 4, 2)
    assert (narrow.vector_lanes("double"), wide.vector_lanes("double")) == (4, 8)


# ----- the target drives the schedule and the code; it keys every cache ----------------------------------

def pairs_model():
    build, shape = NETS["pairs"]
    return cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="numpy")


def test_the_schedule_is_computed_from_the_target():
    """8-wide rows of 16 channels, one vector per row on both widths: two examples at once beside
    a block of channels filling the accumulators, 4 channels on avx2 (8 accumulators), 8 on
    avx512 (16)."""
    prog = pairs_model().prog
    tiles = {}
    for name in TARGETS:
        scheduler = Scheduler(prog, target=name)
        assert scheduler.lanes == tg.named(name).lanes
        [tpl] = scheduler.single(next(s for s in prog.forward if s.out == "2.out.conv")).templates[0]
        tiles[name] = (tpl.kind, tpl.tile, tpl.pair)
    assert tiles["avx2"] == ("tiled_row", ("n", 4, 16), "b")
    assert tiles["avx512"] == ("tiled_row", ("n", 8, 16), "b")


def test_model_schedule_describes_the_target_the_model_was_compiled_for():
    """``model.schedule()`` prints the schedule its code was written for, not the environment's."""
    from cnncompile.schedule_text import schedule
    build, shape = NETS["pairs"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # avx512 on a host without it: runs split
        model = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), target="avx512")
        texts = {name: schedule(model.prog, None, model.dtype, name) for name in TARGETS}
    assert texts["avx2"] != texts["avx512"]
    assert model.schedule() == texts["avx512"]


def test_16_lane_code_uses_16_lane_vectors():
    prog = pairs_model().prog
    texts = {name: "\n".join(ModuleWriter(code_program(prog, "float", name), "float", "t", target=name).modules(1))
             for name in TARGETS}
    assert "masked.load.v16f32" in texts["avx512"] and "masked.load.v8f32" not in texts["avx512"]
    assert "masked.load.v8f32" in texts["avx2"] and "<16 x float>" not in texts["avx2"]


def test_two_targets_are_two_cache_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNCOMPILE_CACHE_DIR", str(tmp_path))
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        models = {name: cc.compile(net, input_shape=(1, 8, 8), loss=nn.CrossEntropyLoss(), target=name)
                  for name in TARGETS}
        again = cc.compile(net, input_shape=(1, 8, 8), loss=nn.CrossEntropyLoss(), target=tg.named("avx512"))
    assert len(list(tmp_path.rglob("*.program"))) == 2
    assert not any(m.warm_start for m in models.values()) and again.warm_start
    assert again.executable.target == tg.named("avx512") and models["avx2"].executable.target.lanes == 8
    assert jit.fingerprint("ir", tg.named("avx2")) != jit.fingerprint("ir", tg.named("avx512"))
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(again.predict(x), models["avx2"].predict(x), rtol=1e-5, atol=1e-6)


# ----- the LLVM backend against NumPy under both widths ---------------------------------------------------

class Grouped(nn.Module):
    """Grouped and depth-wise convolutions with stride, padding and dilation, an average pool
    and a residual add."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.c = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(16 * 4 * 5, 5)

    def forward(self, x):
        h = nn.functional.relu(self.a(x))
        h = nn.functional.relu(self.b(h)) + h
        return self.head(nn.functional.flatten(self.pool(self.c(h))))


WIDE = {
    "grouped": (Grouped, (4, 17, 19)),
    # 16-wide rows, 32 channels: one 16-lane vector per row and a block of 16 channels for two
    # examples on avx512; rows of 17 and 33 leave one lane over
    "rows16": (lambda: nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1),
                                     nn.MaxPool2d(2), nn.Conv2d(16, 8, (1, 2), padding=(0, 1)), nn.Flatten(),
                                     nn.Linear(8 * 8 * 9, 5)), (3, 16, 16)),
    # (no bias before a batch norm: its true gradient is 0, both backends' values float noise)
    "tails": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, 1, 1),
                                    nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Tanh(), nn.Flatten(),
                                    nn.Linear(4 * 6 * 33, 5)), (2, 6, 33)),
    # 5-wide rows of 32 output channels: the channels as two 16-lane vectors (or four 8-lane)
    "lanes32": (lambda: nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 32, 3), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(32 * 5 * 5, 5)), (2, 9, 9)),
}
CASES = {**{k: NETS[k] for k in ("lenet", "strided", "residual", "downsample", "pooling", "lanes", "pairs",
                                 "parity", "batchnorm")}, **WIDE}


def case_params():
    """Every case under both targets; the test_llvm networks under avx2 (the default target, which
    test_llvm.py already compares on every buffer) run with the slow tests."""
    return [pytest.param(name, target, marks=[pytest.mark.slow] if target == "avx2" and name in NETS else [])
            for target in TARGETS for name in CASES]


@pytest.mark.parametrize("name, target", case_params())
def test_llvm_matches_numpy_on_every_buffer_under_each_target(name, target):
    compare_every_buffer(name, target)


@pytest.mark.parametrize("name", ["tails", "rows16", "lenet"])
@pytest.mark.parametrize("width", TARGETS)
def test_rows_with_tails_stored_by_masked_stores_match_numpy(name, width):
    """`Target.masked_tails` (one masked store for a row's partial last vector instead of pieces
    of halving width; an option, off by default), forced on for both widths on any host."""
    target = dataclasses.replace(tg.named(width), masked_tails=True)
    compare_every_buffer(name, target)


def test_masked_tails_change_only_the_tail_stores():
    prog = cc.compile(CASES["tails"][0](), input_shape=CASES["tails"][1], loss=nn.CrossEntropyLoss(),
                      backend="numpy").prog
    plain = tg.named("avx2")
    texts = {m: "\n".join(ModuleWriter(code_program(prog, "float", t), "float", "t", target=t).modules(1))
             for m, t in ((False, plain), (True, dataclasses.replace(plain, masked_tails=True)))}
    assert texts[True].count("@llvm.masked.store") > texts[False].count("@llvm.masked.store")
    assert texts[True].count("store <4 x float>") < texts[False].count("store <4 x float>")
    assert plain.key() != dataclasses.replace(plain, masked_tails=True).key()


def compare_every_buffer(name, target):
    """The LLVM backend's grads phase under ``target`` against NumPy's, every buffer poisoned first."""
    build, shape = CASES[name]
    model = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="numpy", seed=2)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, *shape)).astype(np.float32)
    _, feeds = model._feeds(x, rng.integers(0, 5, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        llvm_exe = LLVMExecutable(model.prog, np.float32, target=target)
    assert llvm_exe.target.lanes == tg.resolve(target).lanes
    for k, v in model.executable.state.items():
        llvm_exe.state[k][...] = v
    results = []
    for ex in (model.executable, llvm_exe):
        poison(ex, 5)
        results.append(ex.run("grads", 5, feeds, share=False))
    every_buffer_matches(*results, model.prog)


@pytest.mark.parametrize("name", ["lenet", "rows16", "batchnorm"])
def test_train_steps_under_16_lanes_match_numpy(name):
    """Fused train steps (epilogues, the update in the gradient kernels, dead stores elided)."""
    build, shape = CASES[name]
    opt = cc.optim.SGD(lr=0.05, momentum=0.9, weight_decay=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        models = [cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend=b, seed=2, optimizer=opt,
                             target="avx512") for b in ("numpy", "llvm")]
    train_alike(models, shape)


@pytest.mark.parametrize("target", TARGETS)
def test_the_cases_exercise_every_template_under_each_target(target):
    """The networks compared above run every register template and its variants on both widths
    (pairs, channel lanes, blocks, unroll-and-jam, sibling sums, interleaved classes, epilogues)."""
    seen = set()
    for build, shape in CASES.values():
        prog = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="numpy").prog
        for kernel in Scheduler(code_program(prog, "float", target), target=target).kernels("grads"):
            for tpl in (t for terms in kernel.templates for t in terms):
                seen |= {tpl.kind} | {f"{tpl.kind}+{flag}" for flag in ("pair", "scatter", "block") if getattr(tpl, flag)}
            seen |= {name for name, there in (("siblings", kernel.siblings), ("epilogue", kernel.epilogue),
                                              ("interleaved", any(p for _, p in kernel.class_groups))) if there}
    assert seen >= {"row", "tiled_row", "tiled_row+pair", "tiled_row+scatter", "reduction_row", "tiled_reduction_row",
                    "tiled_reduction_row+block", "max_row", "map_row", "scalar", "scalar+block", "siblings", "epilogue",
                    "interleaved"}, seen
