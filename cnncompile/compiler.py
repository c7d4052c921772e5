"""``cc.compile``: trace → graph IR → stages → derived gradients → update stages → backend."""
from __future__ import annotations

import time
import warnings

import numpy as np

from cnncompile.ir.errors import CompileError
from cnncompile.nn.loss import Loss
from cnncompile.nn.module import Module, TracedTensor
from cnncompile.nn.tracing import Tracer

from . import program_cache
from .frontends.torch_fx import as_network

BACKENDS = ("llvm", "numpy")


def heads_of(out) -> list[tuple[object, TracedTensor]]:
    """The network's outputs as (key, tensor): one tensor, a tuple, or a dict (several heads)."""
    if isinstance(out, TracedTensor):
        return [(None, out)]
    if isinstance(out, (tuple, list)):
        return list(enumerate(out))
    if isinstance(out, dict):
        return list(out.items())
    raise CompileError(f"forward() returned {type(out).__name__}; return a tensor, a tuple or a dict of tensors")


def per_head(value, heads, what: str) -> list:
    """A loss (or weight) for each head, matched like the heads themselves."""
    keys = [k for k, _ in heads]
    if keys == [None]:
        return [value]
    if isinstance(value, dict) and set(value) == set(keys):
        return [value[k] for k in keys]
    if isinstance(value, (tuple, list)) and len(value) == len(keys):
        return list(value)
    raise CompileError(f"the network has heads {keys}; give {what} as a matching "
                       f"{'dict' if isinstance(keys[0], str) else 'tuple'}, got {value!r}")


def trace(net: Module, input_shape, loss=None, loss_weights=None):
    net = as_network(net)  # a torch.nn.Module: converted (torch is imported only then)
    if not isinstance(net, Module):
        raise CompileError(f"cc.compile expects a cnncompile.nn.Module or a torch.nn.Module, got {type(net).__name__}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or min(shape) < 1:
        raise CompileError(f"input_shape must be one example's shape without the batch axis, got {input_shape!r}")
    tracer = Tracer(net)
    with tracer:
        x = tracer.input("input", shape)
        heads = heads_of(net(x))
        loss_name, targets = "", []
        if loss is not None:
            losses = per_head(loss, heads, "loss")
            totals = []
            for (key, pred), fn in zip(heads, losses):
                if not isinstance(fn, Loss):
                    raise CompileError(f"loss for head {key!r} must be an nn loss (CrossEntropyLoss, MSELoss, "
                                       f"L1Loss), got {fn!r}")
                name = "target" if key is None else f"target.{key}"
                target = tracer.input(name, fn.target_shape(pred.shape), role="label", dtype=fn.target_dtype)
                targets.append(target.name)
                totals.append(tracer.add_loss(fn.kind, [pred, target], type(fn).__name__,
                                              "loss" if key is None else f"loss.{key}", **fn.attrs()))
            weights = per_head(loss_weights, heads, "loss_weights") if loss_weights is not None else [1.0] * len(totals)
            total = totals[0] if len(totals) == 1 and weights[0] == 1.0 else \
                tracer.add_loss("weighted_sum", totals, "total", "loss", weights=[float(w) for w in weights])
            loss_name = total.name
    return tracer, heads, targets, loss_name


def compile(net: Module, input_shape, loss=None, optimizer=None, backend: str | None = None, seed: int = 0,
            dtype="float32", loss_weights=None, input_grad: bool = False, distributed: str | None = None,
            sync_batchnorm: bool = False, target=None, tune: bool = False, tune_seconds: float | None = None):
    """Compile ``net`` into a trainer (docs/architecture.md, §1). ``input_grad``: also derive
    ∂L/∂input, handed out by ``model.input_gradient`` (saliency; checks of the derivation).
    ``distributed="mpi"``: data-parallel training over the MPI ranks (`cnncompile.distributed`);
    ``sync_batchnorm``: batch norm normalizes with the global batch's statistics there.
    ``target``: what the LLVM backend writes code for, a name (``"avx2"``, ``"avx512"``, ``"host"``)
    or a `cnncompile.backends.llvm.target.Target` (default: ``CNNCOMPILE_TARGET``, else the host's).
    ``tune=True``: time a few blockings per kernel on this host within ``tune_seconds`` (default
    30 s for the whole network) and keep the fastest, stored so later tuned compiles time nothing
    (`cnncompile.backends.llvm.tuner`); ``model.tune_report`` says what was chosen."""
    from .model import Model

    started = time.perf_counter()
    net = as_network(net)
    if optimizer is not None and loss is None:
        raise CompileError("an optimizer needs a loss: pass loss=nn.CrossEntropyLoss() (or another)")
    dtype, executable_class = np.dtype(dtype), backend_class(backend)
    if dtype not in (np.float32, np.float64):
        raise CompileError(f"dtype must be float32 or float64, got {dtype}")
    tracer, heads, targets, loss_name = trace(net, input_shape, loss, loss_weights)
    outputs = [t.name for _, t in heads]
    if input_grad and loss is None:
        raise CompileError("input_grad=True needs a loss: pass loss=nn.CrossEntropyLoss() (or another)")
    grad_inputs = [t for t in tracer.graph.inputs if tracer.graph.tensors[t].role == "input"] if input_grad else []
    backend_options = {"target": target} if executable_class.name == "llvm" else {}  # (NumPy has no target)
    def key_for(options: tuple) -> str:
        return program_cache.key(tracer.graph, outputs + [f"dL/d{t}" for t in grad_inputs], loss_name, optimizer,
                                 executable_class.name, dtype,
                                 options + (("sync_batchnorm",) if sync_batchnorm else ()))

    def fresh_program():
        prog = build_program(tracer, outputs, targets, loss_name, loss, optimizer, grad_inputs)
        if sync_batchnorm:  # grads runs in segments; the ranks sum batch statistics (and their gradients) between
            from .distributed import sync_cuts
            prog.cuts = sync_cuts(prog, tracer.graph)
        return prog

    def untuned_program():  # (the untuned entry's, if any: nothing is derived again)
        stored = program_cache.load(name)
        return stored["prog"] if stored is not None else fresh_program()

    name = key_for(executable_class.codegen_options(**backend_options))
    entry = None if tune else program_cache.load(name)
    tune_report = None
    if tune:
        if executable_class.name != "llvm":
            raise CompileError("tune=True times the LLVM backend's code: drop tune= or use backend='llvm'")
        from cnncompile.backends.llvm.tuner import tuned_executable
        prog, executable, tune_report, warm = tuned_executable(
            name, untuned_program, dtype, target, tune_seconds, key_for,
            lambda key, prog_, exe: program_cache.store(key, {"prog": prog_, "manifest": exe.manifest()}))
        entry = {} if warm else None
    elif entry is not None:  # a warm start: nothing is derived, scheduled or generated again
        prog = entry["prog"]
        executable = executable_class(prog, dtype, manifest=entry["manifest"], **backend_options)
    else:
        prog = fresh_program()
        executable = executable_class(prog, dtype, **backend_options)
        program_cache.store(name, {"prog": prog, "manifest": executable.manifest()})
    model = Model(net=net, tracer=tracer, heads=heads, prog=prog, executable=executable, loss=loss,
                  optimizer=optimizer, input_shape=tuple(input_shape))
    model.seed, model.loss_weights, model.tune_report = seed, loss_weights, tune_report
    model.reset_parameters(seed)
    model.compile_seconds, model.warm_start = time.perf_counter() - started, entry is not None
    if distributed is not None:
        from .distributed import distribute
        distribute(model, distributed)
    return model


def build_program(tracer, outputs, targets, loss_name, loss, optimizer, grad_inputs=()):
    """Graph IR → forward stages → derived backward stages (both modes where they differ) → update stages."""
    from cnncompile.ir.autodiff import derive  # (sympy: a warm start never derives)

    prog = tracer.graph.lower(outputs, loss_name)
    prog.labels, prog.grad_inputs = targets, list(grad_inputs)
    if loss is not None:
        wrt = prog.params + prog.grad_inputs
        prog.backward = derive(prog, wrt, "train")
        if prog.has_modes:  # batch norm / dropout: eval-mode gradients are derived separately
            prog.backward += derive(prog, wrt, "eval")
    if optimizer is not None:
        prog.update += optimizer.stages(prog)
    return prog


def backend_class(backend):
    """The executable class for ``backend`` (default LLVM); NumPy, with one warning, where llvmlite cannot load."""
    backend = backend or "llvm"
    if backend not in BACKENDS:
        raise CompileError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "llvm":
        try:
            import llvmlite.binding  # noqa: F401 - only llvmlite itself failing to load means "no LLVM here"
        except ImportError as exc:  # llvmlite missing or unloadable: NumPy runs the same stages
            warnings.warn(f"llvmlite cannot be loaded ({exc}); using the NumPy backend", RuntimeWarning)
        else:  # a broken module of our own is an error, never a silent switch of backend
            from cnncompile.backends.llvm.program import LLVMExecutable
            return LLVMExecutable
    from cnncompile.backends.numpy.program import NumpyExecutable
    return NumpyExecutable


def derivation(net: Module, input_shape, loss=None, optimizer=None, loss_weights=None, backend: str | None = None,
               dtype="float32"):
    """The traced graph and (on first use) the derived program, with no executable: what `explain`,
    `summary` and `schedule` print, without the seconds machine code takes to generate."""
    from .derivation import Derivation

    if optimizer is not None and loss is None:
        raise CompileError("an optimizer needs a loss: pass loss=nn.CrossEntropyLoss() (or another)")
    tracer, heads, targets, loss_name = trace(net, input_shape, loss, loss_weights)
    return Derivation(net, tracer, heads, targets, loss_name, loss, optimizer, input_shape, backend, dtype)
