"""The LLVM backend against the NumPy reference, with every buffer poisoned first, and the
properties of the generated code: packed FMA, determinism, cache robustness, validation."""
import os
import runpy
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cnncompile as cc
from helpers import SCHEDULE_TARGET
from cnncompile import nn
from cnncompile.backends.llvm import jit
from cnncompile.backends.llvm.program import LLVMExecutable
from cnncompile.backends.numpy.program import NumpyExecutable

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parent.parent / "examples"


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.head = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        h = nn.functional.relu(self.conv(x))
        h = nn.functional.tanh(self.a(h)) + h
        h = nn.functional.max_pool2d(h, 3, stride=1, padding=1) * 0.5
        return self.head(nn.functional.flatten(self.pool(h)))


class Downsample(nn.Module):
    """A projection shortcut beside a stride-2 convolution: their input gradients (vector rows
    stored every other element, empty residue classes zeroed) add into one tensor."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.shortcut = nn.Conv2d(4, 6, 1, stride=2)
        self.head = nn.Linear(6 * 9 * 9, 5)

    def forward(self, x):
        h = nn.functional.relu(self.stem(x))
        return self.head(nn.functional.flatten(self.conv(h) + self.shortcut(h)))


NETS = {
    "lenet": (lambda: nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.Sigmoid(),
                                    nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 10)), (1, 32, 32)),
    "strided": (lambda: nn.Sequential(nn.Conv2d(2, 3, (3, 2), stride=3, padding=2, dilation=2), nn.LeakyReLU(0.2),
                                      nn.Conv2d(3, 5, 2, stride=2, dilation=2), nn.Flatten(), nn.Linear(20, 5)), (2, 13, 11)),
    "residual": (Residual, (3, 11, 10)),
    "downsample": (Downsample, (3, 18, 17)),
    # dense layers with blocks of 8 outputs around their 200-long loops (3 blocks for 2 threads)
    "dense": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(200, 24), nn.ReLU(),
                                    nn.Linear(24, 5)), (1, 12, 12)),
    # max-pool gradients: interleaved vector rows on pooled rows of 17 (two vectors, a 1-lane
    # tail); then a 17-wide map whose last column is in no window (per-class loops, not merged)
    "pooling": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(3, 2, 1),
                                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 9 * 8, 5)), (2, 36, 34)),
    # 5- and 4-wide rows: output channels (8, 16) run as vector lanes from packed copies, written
    # lane by lane, with vector (bias, ReLU) and scalar (ReLU′ reading a strided value) epilogues
    "lanes": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, (1, 4)), nn.Tanh(),
                                    nn.Flatten(), nn.Linear(16 * 6 * 2, 5)), (3, 8, 7)),
    # 8-wide rows, 16 channels: two examples at once beside blocks of 4 channels, forward and
    # input gradient (the tests' odd batch of 5: the last pair is the last example twice, stored once)
    "pairs": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                    nn.Tanh(), nn.Flatten(), nn.Linear(16 * 5 * 8, 5)), (3, 5, 8)),
    # stride-2 reads of even-width maps (20 and 10 columns) from even/odd copies: a 3×3 convolution
    # with padding (odd offsets: the odd copy, a column to the left) and a 1×1 (even offsets), with
    # their filter gradients; rows of 10 and 5 outputs (lanes past the end)
    "parity": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                                     nn.ReLU(), nn.Conv2d(8, 4, 1, stride=2), nn.Flatten(), nn.Linear(4 * 3 * 5, 5)),
               (3, 10, 20)),
    # rows of 20 and 18 floats: three vectors each, lanes past the end, under sums that are not 0
    # there ((X − μ)² in the batch variance)
    # (no bias before a batch norm: its true gradient is 0, both backends' values float noise)
    "batchnorm": (lambda: nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                                        nn.Conv2d(3, 2, (8, 3), bias=False),
                                        nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 11 * 18, 5)), (1, 20, 22)),
}


def every_buffer_matches(ref, got, prog):
    """Every working buffer written (no poison left) and equal to the reference's: indices exactly,
    floats within 1e-5 of the tensor's scale."""
    for tensor, spec in prog.tensors.items():
        if spec.role in ("param", "state"):
            continue
        assert not np.isnan(got[tensor]).any(), f"{tensor} has unwritten elements"
        if spec.dtype != "float":
            np.testing.assert_array_equal(got[tensor], ref[tensor], err_msg=tensor)
        else:
            scale = max(float(np.abs(ref[tensor]).max()), 1e-6)
            assert np.abs(got[tensor] - ref[tensor]).max() / scale < 1e-5, tensor


def train_alike(models, shape, steps=2):
    """Train a NumPy-backend model and an LLVM one side by side on the same batches, working buffers
    poisoned before each step: equal losses, then equal parameters and optimizer state (1e-4 of
    scale: float32 rounding through Adam's division)."""
    rng = np.random.default_rng(5)
    for _ in range(steps):
        x = rng.standard_normal((5, *shape)).astype(np.float32)
        y = rng.integers(0, 5, 5)
        for model in models:
            poison(model.executable, 5, share=model.executable.name == "llvm")
        losses = [m.train_step(x, y) for m in models]
        assert abs(losses[0] - losses[1]) <= 1e-5 * max(1.0, abs(losses[0]))
    ref, got = (m.executable.state for m in models)
    for k in ref:
        scale = max(float(np.abs(ref[k]).max()), 1e-6)
        assert np.abs(got[k] - ref[k]).max() / scale < 1e-4, k


def poison(executable, batch, share=False):
    env = executable.bind(batch, share)[0]
    for name, spec in executable.prog.tensors.items():
        if spec.role not in ("param", "buffer", "state", "input", "label"):
            env[name][...] = -987654321 if spec.dtype != "float" else np.nan
    return env


@pytest.mark.parametrize("name", list(NETS))
def test_llvm_matches_numpy_on_every_buffer(name):
    build, shape = NETS[name]
    model = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="numpy", seed=2)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, *shape)).astype(np.float32)
    y = rng.integers(0, 5, 5)
    _, feeds = model._feeds(x, y)
    llvm = LLVMExecutable(model.prog, np.float32)
    for ex in (model.executable, llvm):
        for k, v in model.executable.state.items():
            ex.state[k][...] = v
    results = []
    for ex in (model.executable, llvm):
        poison(ex, 5)
        results.append(ex.run("grads", 5, feeds, share=False))
    every_buffer_matches(*results, model.prog)


@pytest.mark.parametrize("name", list(NETS))
def test_shared_activation_memory_gives_the_same_step_as_separate_buffers(name):
    """Train steps with the buffer plan's shared arena against every tensor in its own memory:
    the same loss, outputs and parameters, bit for bit; and the arena is smaller."""
    build, shape = NETS[name]
    model = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="llvm", seed=2,
                       optimizer=cc.optim.SGD(lr=0.1, momentum=0.9))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, *shape)).astype(np.float32)
    y = rng.integers(0, 5, 5)
    _, feeds = model._feeds(x, y)
    start = {k: v.copy() for k, v in model.executable.state.items()}
    ends = []
    for share in (True, False):
        for k, v in start.items():
            model.executable.state[k][...] = v
        poison(model.executable, 5, share)
        losses = [float(model.executable.run("train", 5, feeds, model.optimizer.scalars(k + 1),
                                             share=share)["loss.out"][0]) for k in range(3)]
        out = model.executable.run("predict", 5, {"input": x}, share=share)[model.prog.outputs[0]].copy()
        ends.append((losses, out, {k: v.copy() for k, v in model.executable.state.items()}))
    (l1, o1, s1), (l2, o2, s2) = ends
    assert l1 == l2
    np.testing.assert_array_equal(o1, o2)
    for k in s1:
        np.testing.assert_array_equal(s1[k], s2[k], err_msg=k)
    plan = model.executable.plan(5)
    assert plan.arena_bytes < plan.unshared_bytes
    report = model.memory_report(5)
    assert (report["work_bytes"], report["work_bytes_unshared"]) == (plan.arena_bytes, plan.unshared_bytes)


def test_buffer_plan_never_overlaps_live_tensors():
    from cnncompile.ir.buffers import overlap, plan_buffers
    spec = runpy.run_path(str(EXAMPLES / "resnet20.py"))
    model = cc.compile(spec["net"], spec["input_shape"], loss=spec["loss"], optimizer=spec["optimizer"],
                       backend="numpy")
    plan = plan_buffers(model.prog, 32)
    items = list(plan.placements.items())
    for k, (a, pa) in enumerate(items):
        assert pa.offset % 64 == 0
        for b, pb in items[k + 1:]:
            if overlap(pa.spans, pb.spans):  # alive together in some phase: disjoint bytes
                assert pa.offset + pa.nbytes <= pb.offset or pb.offset + pb.nbytes <= pa.offset, (a, b)
    assert plan.arena_bytes < 0.7 * plan.unshared_bytes


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fused_train_steps_match_numpy(name, optimizer):
    """Whole train phases (epilogues fused: bias, activations, the optimizer's update inside the
    gradient kernels) against the NumPy backend, every working buffer poisoned first."""
    build, shape = NETS[name]
    opt = (cc.optim.SGD(lr=0.05, momentum=0.9, weight_decay=1e-3) if optimizer == "sgd"
           else cc.optim.Adam(lr=1e-2, eps=1e-4, weight_decay=1e-3))  # (a gradient near 0 next to eps=1e-8
    # makes Adam's step ±lr on rounding noise alone: a test of the fused update, not of that)
    models = [cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend=b, seed=2, optimizer=opt)
              for b in ("numpy", "llvm")]
    train_alike(models, shape)


def test_schedule_fuses_elementwise_stages_and_updates_into_their_producers():
    from cnncompile.backends.llvm.schedule import Scheduler
    build, shape = NETS["lenet"]
    model = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="numpy",
                       optimizer=cc.optim.SGD(lr=0.1, momentum=0.9))
    plan = {k.main.out: [s.out for s in k.stages[1:]] for k in Scheduler(model.prog, target=SCHEDULE_TARGET).kernels("train")}
    assert plan["0.out.conv"] == ["0.out", "1.out"]  # bias and ReLU in the convolution's epilogue
    assert plan["dL/d0.weight"] == ["0.weight.momentum_buffer", "0.weight"]  # the update in the gradient's
    # a dense weight gradient (plain loops n, b, k: the row k inside the sum) hosts its update too,
    # in a loop over the row once the sum over b is closed
    assert plan["dL/d7.weight"] == ["7.weight.momentum_buffer", "7.weight"]
    assert len(plan) < len(model.prog.phase_stages("train"))
    grads = {k.main.out: [s.out for s in k.stages[1:]] for k in Scheduler(model.prog, target=SCHEDULE_TARGET).kernels("grads")}
    assert grads["dL/d0.weight"] == []  # no update where gradients are only handed out


def test_max_pool_gradients_run_as_interleaved_vector_rows():
    """The four window positions of a 2×2 max pool's gradient (residue classes) run as one loop
    nest, the column pairs as interleaved vector rows where the pooled row is a vector long."""
    from cnncompile.backends.llvm.schedule import Scheduler
    for name, stage, expected in (("lenet", "dL/d1.out", (4, ("v_q", 14))), ("lenet", "dL/d4.out", (4, None)),
                                  ("pooling", "dL/d0.out", (4, ("v_q", 17))), ("pooling", "dL/d2.out", None)):
        build, shape = NETS[name]
        model = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="numpy")
        scheduler = Scheduler(model.prog, target=SCHEDULE_TARGET)
        [kernel] = [scheduler.single(s) for s in model.prog.backward if s.out == stage and "argmax" in str(s.body)]
        merged = [(len(group), pairs[:2] if pairs else None) for group, pairs in kernel.class_groups if len(group) > 1]
        assert merged == ([expected] if expected else []), (name, stage)


def test_dense_layers_jam_a_block_of_outputs_around_the_long_loop():
    """A dense layer's forward (dot products over 400 inputs) and weight gradient (rows of 400)
    compute 8, 4 or 2 outputs per pass of the long loop, sharing the other read's loads."""
    from cnncompile.backends.llvm.schedule import Scheduler
    net = nn.Sequential(nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    model = cc.compile(net, input_shape=(400,), loss=nn.CrossEntropyLoss(), backend="numpy")
    scheduler = Scheduler(model.prog, target=SCHEDULE_TARGET)
    blocks = {s.out: scheduler.single(s).templates[0][0].block for s in model.prog.all_stages()
              if s.out.endswith(".mm") or s.out.endswith("weight")}
    assert blocks["1.out.mm"] == ("n", 8, 120) and blocks["3.out.mm"] == ("n", 4, 84)
    assert blocks["dL/d1.weight"] == ("n", 8, 120) and blocks["5.out.mm"] == ("n", 2, 10)
    dx = [scheduler.single(s).templates[0][0] for s in model.prog.backward if s.out == "dL/d2.out"]
    assert [(t.block, t.order) for t in dx] == [(("n_t", 4, 84), ("b", "n_t", "k"))]  # the sum's block in place


def test_filter_gradients_of_wide_maps_block_output_channels():
    """A 3×3 filter gradient over 32-wide rows (four vectors) keeps one accumulator per kernel
    column and output channel of a block, the row's chunks added into it: a block of 4 channels
    (12 accumulators) instead of none (3 columns × 4 chunks filled the 12 before)."""
    from cnncompile.backends.llvm.schedule import Scheduler
    net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 32 * 32, 2))
    model = cc.compile(net, input_shape=(16, 32, 32), loss=nn.CrossEntropyLoss(), backend="numpy")
    [tpl] = [Scheduler(model.prog, target=SCHEDULE_TARGET).single(s).templates[0][0] for s in model.prog.backward if s.out == "dL/d0.weight"]
    assert (tpl.kind, tpl.extent, tpl.tile, tpl.block) == ("tiled_reduction_row", 32, ("j", 3), ("n", 4, 16))


def test_one_vector_rows_pair_examples():
    """Where a row is one vector and its block of output channels fills the 8 accumulators, the
    block halves and two examples run at once: their input vectors share each weight broadcast.
    Not where the row is longer (two vectors already share them), nor for a plain loop's sum."""
    from cnncompile.backends.llvm.schedule import Scheduler
    build, shape = NETS["pairs"]
    model = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="numpy")
    scheduler = Scheduler(model.prog, target=SCHEDULE_TARGET)
    tiles = {s.out: (t.tile, t.pair) for s in model.prog.all_stages()
             for t in [scheduler.single(s).templates[0][0]] if t.kind == "tiled_row"}
    assert tiles["2.out.conv"] == (("n", 4, 16), "b")
    assert tiles["dL/d1.out"] == (("m", 4, 16), "b")
    build, shape = NETS["batchnorm"]
    model = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="numpy")
    scheduler = Scheduler(model.prog, target=SCHEDULE_TARGET)
    assert all(t.pair is None for s in model.prog.all_stages() for t in scheduler.single(s).templates[0])


def test_stride_2_reads_come_from_even_odd_copies():
    """A map read at stride 2 along its rows by convolutions (forward and filter gradient) gets
    one even/odd copy, made right after it in the forward pass; the stages that read it are
    marked so; the derivation's program is left as it was."""
    from cnncompile.backends.llvm.codegen import code_program
    build, shape = NETS["parity"]
    model = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="numpy")
    code = code_program(model.prog, "float", SCHEDULE_TARGET)
    forward = [s.out for s in code.forward]
    assert forward.index("1.out.parity") == forward.index("1.out") + 1
    assert forward.index("3.out.parity") == forward.index("3.out") + 1
    assert code.tensors["1.out.parity"].shape[1:] == (8, 10, 2, 10)
    marked = {s.out: s.packed for s in code.forward + code.backward if s.packed}
    assert marked == {"2.out.conv": ("1.out.parity",), "dL/d2.weight": ("1.out.parity",),
                      "4.out.conv": ("3.out.parity",), "dL/d4.weight": ("3.out.parity",)}
    assert not any(s.out.endswith(".parity") or s.packed for s in model.prog.forward + model.prog.backward)


def test_batch_norm_runs_as_vector_rows():
    """Batch norm's elementwise stages (normalize, its gradient's accumulations) run as vector
    rows along the map's last axis, its backward reductions (through σ = √(σ² + ε)) as vector
    reduction rows; a per-channel update (one loop: nothing for the threads to split) does not."""
    from cnncompile.backends.llvm.schedule import Scheduler
    build, shape = NETS["batchnorm"]
    model = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="numpy",
                       optimizer=cc.optim.SGD(lr=0.1))
    scheduler = Scheduler(model.prog, target=SCHEDULE_TARGET)
    kinds = {}
    for _, _, s in model.prog.phase_stages("train"):
        kinds.setdefault((s.out, s.note), scheduler.single(s).templates[0][0].kind)
    assert kinds[("1.out", "normalize, scale, shift")] == "map_row"
    assert kinds[("dL/d0.out", "through batch variance σ²")] == "map_row"
    assert kinds[("dL/d1.out.var", "through normalize, scale, shift")] == "reduction_row"
    assert kinds[("1.weight", "SGD")] == "scalar"


def test_batch_norm_backward_sums_share_one_loop_nest():
    """Batch norm's four backward sums over a channel's values (β's and γ's gradients, and
    through μ and σ²) run as siblings in one loop nest, each with its own accumulator and
    epilogue (the momentum buffers); γ's update, which two of them read, waits for a kernel of
    its own."""
    from cnncompile.backends.llvm.schedule import Scheduler
    build, shape = NETS["batchnorm"]
    model = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="numpy",
                       optimizer=cc.optim.SGD(lr=0.1, momentum=0.9))
    kernels = Scheduler(model.prog, target=SCHEDULE_TARGET).kernels("train")
    [group] = [[(m.main.out, [s.out for s, _ in m.epilogue]) for m in k.members] for k in kernels
               if k.main.out == "dL/d1.bias"]
    assert group == [("dL/d1.bias", ["1.bias.momentum_buffer", "1.bias"]), ("dL/d1.out.mean", []),
                     ("dL/d1.out.var", []), ("dL/d1.weight", ["1.weight.momentum_buffer"])]
    assert any(k.main.out == "1.weight" and not k.siblings for k in kernels)


def test_values_used_only_inside_their_kernel_are_never_stored():
    """In the train step, a value that only its own kernel's epilogue reads (a residual block's
    batch-norm output before the add, the input gradient before ReLU′) stays in registers; the
    step still matches NumPy's, which stores everything, and other phases store it."""
    sys.path.insert(0, os.path.dirname(__file__))
    from zoo_nets import INPUT_SHAPE, ZOO
    models = [cc.compile(ZOO["resnet_basic"](nn), input_shape=INPUT_SHAPE, loss=nn.CrossEntropyLoss(), seed=3,
                         backend=b, optimizer=cc.optim.SGD(lr=0.1, momentum=0.9)) for b in ("numpy", "llvm")]
    elided = models[1].executable.elided
    assert {"block1.shortcut.1.out", "dL/drelu_1.out", "dL/dadd_1.out"} <= elided, sorted(elided)
    assert not elided & ({models[1].prog.loss_name} | set(models[1].prog.outputs) | set(models[1].prog.params))
    rng = np.random.default_rng(0)
    for step in range(3):
        x = rng.standard_normal((6, *INPUT_SHAPE)).astype(np.float32)
        y = rng.integers(0, 5, 6)
        losses = [m.train_step(x, y) for m in models]
        assert abs(losses[0] - losses[1]) <= 1e-5 * max(1.0, abs(losses[0]))
    for k, ref in models[0].state_dict().items():
        scale = max(float(np.abs(ref).max()), 1e-6)
        assert np.abs(models[1].state_dict()[k] - ref).max() / scale < 1e-5, k  # (float32 rounding: ~1e-6)
    x = rng.standard_normal((6, *INPUT_SHAPE)).astype(np.float32)
    poison(models[1].executable, 6)
    env = models[1].executable.run("predict_train", 6, {"input": x}, share=False)
    assert np.isfinite(env["block1.shortcut.1.out"]).all()  # stored where the train step does not


def test_max_pools_run_as_vector_rows_where_a_row_fills_a_vector():
    from cnncompile.backends.llvm.schedule import Scheduler
    build, shape = NETS["lenet"]
    model = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="numpy")
    scheduler = Scheduler(model.prog, target=SCHEDULE_TARGET)
    kinds = {s.out: scheduler.single(s).templates[0][0].kind for s in model.prog.forward if s.argmax}
    assert kinds == {"2.out": "max_row", "5.out": "scalar"}  # pooled rows of 14 and 5


def test_short_rows_run_output_channels_as_vector_lanes():
    """LeNet-5's second convolution (10-wide rows: 10 of 16 lanes) and its filter gradient (5-wide
    kernel rows: 5 of 8) run their 16 output channels as the vector instead, from copies of the
    weights and of the output gradient with the channel axis last; the derivation's own program
    (what explain shows) keeps reading the tensors as derived."""
    from cnncompile.backends.llvm.schedule import pack_lanes
    from cnncompile.backends.llvm.schedule import Scheduler
    model = cc.compile(runpy.run_path(str(EXAMPLES / "lenet5.py"))["net"], input_shape=(1, 32, 32),
                       loss=nn.CrossEntropyLoss(), backend="numpy")
    packed = pack_lanes(model.prog, 8)
    scheduler = Scheduler(packed, target=SCHEDULE_TARGET)
    lanes = {s.out: (s.lanes, scheduler.single(s).templates[0][0]) for s in packed.all_stages() if s.lanes}
    assert {k: (u, t.row, t.extent, t.tile, t.scatter) for k, (u, t) in lanes.items()} == {
        "3.out.conv": ("n", "n", 16, ("y", 5, 10), True), "dL/d3.weight": ("n", "n", 16, ("j", 5, 5), True)}
    assert lanes["3.out.conv"][1].order[-2] == "i_t"  # no tile broadcast repeats inside the innermost sum
    packs = {s.out: str(s.body) for s in packed.all_stages() if s.out.endswith(".lanes")}
    assert packs == {"3.weight.lanes": "3.weight[p0, p1, p2, p3]", "dL/d3.out.conv.lanes": "dL/d3.out.conv[p0, p1, p2, p3]"}
    assert packed.tensors["dL/d3.out.conv.lanes"].shape[1:] == (10, 10, 16)
    assert not any(".lanes" in t for t in model.prog.tensors) and not any(s.lanes for s in model.prog.all_stages())
    # in 4-lane doubles a 5-wide row still fills 5 of 8 lanes, but a 10-wide one 10 of 12: enough
    assert pack_lanes(model.prog, 4).tensors.keys() == model.prog.tensors.keys() | {"dL/d3.out.conv.lanes"}


@pytest.mark.parametrize("name", ["lenet", "pooling", "lanes", "batchnorm", "pairs", "parity"])
def test_float64_llvm_matches_numpy(name):
    """Four-lane double vectors through the same templates (interleaved pool rows included)."""
    build, shape = NETS[name]
    models = [cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend=b, seed=3, dtype="float64")
              for b in ("numpy", "llvm")]
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((3, *shape)), rng.integers(0, 5, 3)
    (loss0, grads0), (loss1, grads1) = (m.loss_and_grads(x, y) for m in models)
    assert abs(loss0 - loss1) < 1e-12 * max(1.0, abs(loss0))
    for k in grads0:
        np.testing.assert_allclose(grads1[k], grads0[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_convolution_kernels_use_packed_fma_on_the_targets_vectors(monkeypatch):
    """ymm FMAs for 8 lanes (or 16-lane code split on a host without AVX-512), zmm where 16-lane
    code runs natively."""
    monkeypatch.delenv("CNNCOMPILE_CHECK", raising=False)  # the production code, not the bounds-checked one
    build, shape = NETS["lenet"]
    model = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="llvm")
    asm, ir = model.source("asm"), model.source("llvm")
    target = model.executable.target
    register = "zmm" if target.lanes == 16 and "+avx512f" in target.features.split(",") else "ymm"
    units = model.executable.units("train")
    conv = [j for j, stages in enumerate(units) if stages[0].note.endswith("convolution")]
    assert len(conv) == 2 + 1 + 2  # two convolutions forward and filter gradient, the second's input gradient
    for j in conv:  # the function that the driver running this kernel alone calls
        driver = ir.split(f"_train_u{j}(")[1].split("\n}")[0]
        callee = driver.split("call void @")[1].split("(")[0]
        body = asm.split(f"{callee}:")[1].split(".Lfunc_end")[0]
        assert any("vfmadd" in line and "ps" in line and register in line for line in body.splitlines()), j


def test_models_trained_from_two_python_threads_match_sequential_training():
    """The process's native worker pool serves one phase at a time: two models stepping in two
    Python threads at once end exactly where the same steps one after another end."""
    import threading
    build, shape = NETS["lanes"]
    rng = np.random.default_rng(3)
    batches = [(rng.standard_normal((7, *shape)).astype(np.float32), rng.integers(0, 5, 7)) for _ in range(6)]

    def fresh(seed):
        return cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="llvm", seed=seed,
                          optimizer=cc.optim.SGD(lr=0.05, momentum=0.9))

    def train(model):
        for x, y in batches:
            model.train_step(x, y)

    alone = [fresh(1), fresh(2)]
    for m in alone:
        train(m)
    together = [fresh(1), fresh(2)]
    threads = [threading.Thread(target=train, args=(m,)) for m in together]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        for k, v in a.state_dict().items():
            np.testing.assert_array_equal(b.state_dict()[k], v, err_msg=k)


def test_idle_worker_pool_sleeps(monkeypatch):
    """Between phases the workers spin only briefly: idle, the process uses a small fraction of
    a core (a busy-waiting pool would use one whole core per worker)."""
    import time
    monkeypatch.setenv("CNNCOMPILE_THREADS", "2")
    build, shape = NETS["lanes"]
    model = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="llvm")
    assert model.executable.threads == 2
    model.predict(np.zeros((4, *shape), np.float32))
    time.sleep(0.3)  # past the yielding phase
    cpu, wall = time.process_time(), time.perf_counter()
    time.sleep(0.5)
    used = (time.process_time() - cpu) / (time.perf_counter() - wall)
    assert used < 0.25, f"idle workers used {used:.0%} of a core"


@pytest.mark.parametrize("idle", [0.0, 0.3])
def test_process_exits_cleanly_with_workers_in_their_loop(idle):
    """The workers' loop runs in JIT memory, freed when the interpreter finalizes the engine: they
    are brought out of it at exit, whether spinning (just after a phase) or napping (idle)."""
    code = textwrap.dedent(f"""
        import atexit, runpy, time, numpy as np, cnncompile as cc
        step = lambda: m.train_step(np.zeros((2, 3, 32, 32), np.float32), np.zeros(2, int))
        atexit.register(lambda: print("after", step()))  # runs after the pool stopped: the caller alone
        spec = runpy.run_path({str(EXAMPLES / "resnet20.py")!r})  # (a small net's engine did not show it)
        m = cc.compile(spec["net"], input_shape=spec["input_shape"], loss=spec["loss"],
                       optimizer=cc.optim.SGD(lr=0.1), backend="llvm")
        step()
        time.sleep({idle})
    """)
    env = dict(os.environ, CNNCOMPILE_THREADS="2")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "after" in result.stdout


def train_three(threads: int):
    env = dict(os.environ, CNNCOMPILE_THREADS=str(threads))
    code = textwrap.dedent("""
        import numpy as np, sys, cnncompile as cc
        from cnncompile import nn
        net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 7 * 7, 10))
        m = cc.compile(net, input_shape=(1, 16, 16), loss=nn.CrossEntropyLoss(),
                       optimizer=cc.optim.SGD(lr=0.1, momentum=0.9), backend="llvm", seed=4)
        rng = np.random.default_rng(0)
        for _ in range(3):
            m.train_step(rng.standard_normal((33, 1, 16, 16)), rng.integers(0, 10, 33))
        np.savez(sys.argv[1], **m.state_dict())
    """)
    return code, env


@pytest.mark.parametrize("threads", [1, 2])
def test_determinism_across_runs_and_thread_counts(tmp_path, threads):
    results = []
    for run, t in enumerate([2, threads]):
        code, env = train_three(t)
        out = tmp_path / f"{run}.npz"
        subprocess.run([sys.executable, "-c", code, str(out)], env=env, check=True)
        results.append(np.load(out))
    for key in results[0].files:
        np.testing.assert_array_equal(results[0][key], results[1][key])


def unique_ir(tag: str) -> str:
    return f"define float @cc_test_{tag}(float %x) {{\n  %y = fmul float %x, %x\n  ret float %y\n}}\n"


def test_cache_is_written_atomically_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNCOMPILE_CACHE_DIR", str(tmp_path))
    ir = unique_ir(f"reuse_{os.getpid()}")
    first = jit.Compiled(ir)
    assert not first.from_cache and (tmp_path / f"{first.key}.o").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    code = f"from cnncompile.backends.llvm import jit; print(jit.Compiled({ir!r}).from_cache)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, CNNCOMPILE_CACHE_DIR=str(tmp_path)),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("kind", ["empty", "elf-prefix", "random", "truncated-entry"])
def test_corrupted_cache_entry_is_a_miss(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("CNNCOMPILE_CACHE_DIR", str(tmp_path))
    ir = unique_ir(f"corrupt_{kind.replace('-', '_')}_{os.getpid()}")
    key = jit.fingerprint(ir)
    entry = tmp_path / f"{key}.o"
    if kind == "truncated-entry":  # a real entry cut short
        jit.write_cache(key, jit.target().emit_object(jit.llvm.parse_assembly(ir)))
        entry.write_bytes(entry.read_bytes()[:-100])
    else:
        entry.write_bytes({"empty": b"", "elf-prefix": b"\x7fELF truncated", "random": os.urandom(4096)}[kind])
    compiled = jit.Compiled(ir)
    assert not compiled.from_cache
    assert compiled.address(f"cc_test_corrupt_{kind.replace('-', '_')}_{os.getpid()}")


def test_native_call_rejects_unplanned_shapes():
    build, shape = NETS["lenet"]
    model = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="llvm")
    with pytest.raises(ValueError, match="planned"):
        model.executable.run("grads", 4, {"input": np.zeros((5, *shape), np.float32)})
    with pytest.raises(ValueError, match=r"label 10"):
        model.loss_and_grads(np.zeros((2, *shape)), [0, 10])


def test_predict_and_batch_changes_without_recompiling():
    build, shape = NETS["residual"]
    model = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="llvm")
    ref = cc.compile(build(), input_shape=shape, loss=nn.CrossEntropyLoss(), backend="numpy")
    x = np.random.default_rng(1).standard_normal((7, *shape))
    for n in (7, 1, 3):
        np.testing.assert_allclose(model.predict(x[:n]), ref.predict(x[:n]), rtol=1e-4, atol=1e-6)


def test_phases_compile_on_first_use_and_share_one_program_code():
    """A compile compiles what a trainer runs (train, loss_eval, predict); the gradients alone, in
    each mode, compile when first asked for, calling the kernels already compiled and defining
    only new ones, on buffers laid out again with the new phase's kernels; a second model of the
    same network shares the code, so nothing is compiled twice, and so does one made after the
    phase was compiled (its buffers laid out with that phase too). Gradients equal the NumPy
    backend's, every buffer poisoned before the first run of the new phase."""
    build, shape = NETS["batchnorm"]
    models = [cc.compile(build(), shape, nn.CrossEntropyLoss(), cc.optim.SGD(0.1), backend=backend, seed=2)
              for backend in ("numpy", "llvm", "llvm")]
    code = models[1].executable.code
    assert models[2].executable.code is code
    assert sorted(code.facts) == ["loss_eval", "predict", "train"] and len(code.parts) == 1
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((5, *shape)).astype(np.float32), rng.integers(0, 5, 5)
    for mode, phase in (("train", "grads"), ("eval", "grads_eval")):
        for m in models:
            m.train(mode == "train")
        want_loss, want = models[0].loss_and_grads(x, y)
        parts = len(code.parts)
        models[1].executable.function(phase)  # compiled, and the buffers laid out again with it
        assert len(code.parts) == parts + 1 and phase in code.facts
        new_part = code.parts[-1].ir_text
        assert f"_{phase}_f" in new_part and "declare void @cc_" in new_part  # new kernels, and the first part's
        for m in models[1:]:
            poison(m.executable, 5, share=True)
            loss, grads = m.loss_and_grads(x, y)
            assert abs(loss - want_loss) <= 1e-5 * max(1.0, abs(want_loss))
            for k in want:
                scale = max(float(np.abs(want[k]).max()), 1e-6)
                assert np.abs(grads[k] - want[k]).max() / scale < 1e-4, (phase, k)
        assert len(code.parts) == parts + 1  # the second model compiled nothing
        late = cc.compile(build(), shape, nn.CrossEntropyLoss(), cc.optim.SGD(0.1), backend="llvm", seed=2)
        late.train(mode == "train")  # (a model made after the phase was compiled lays its buffers out with it too)
        assert late.executable.code is code
        poison(late.executable, 5, share=True)
        loss, grads = late.loss_and_grads(x, y)
        assert abs(loss - want_loss) <= 1e-5 * max(1.0, abs(want_loss))
        for k in want:
            scale = max(float(np.abs(want[k]).max()), 1e-6)
            assert np.abs(grads[k] - want[k]).max() / scale < 1e-4, ("late", phase, k)
