"""The compiled model: the trainer a user gets back from ``cc.compile``.

The executable's buffers are shared by every call, so each call holds the executable's lock from
copying its inputs in to copying its outputs out, and hands out copies: one model may be used
from several threads (its calls run one at a time).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from cnncompile.ir.expr import grad_name
from cnncompile.ir.errors import CompileError
from cnncompile.ir.ops.norm import counter_scalars, tracked_calls

from . import validate


def _numpy(value) -> np.ndarray:
    """A NumPy array from a NumPy array, a list, or a torch tensor (a PyTorch state_dict loads as it is)."""
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


class Model:
    def __init__(self, net, tracer, heads, prog, executable, loss, optimizer, input_shape):
        self.net, self.tracer, self.heads, self.prog = net, tracer, heads, prog
        self.executable, self.loss, self.optimizer = executable, loss, optimizer
        self.input_shape = input_shape
        self.dtype = executable.dtype
        self.training = True
        self.step = 0  # optimizer updates done
        self.noise_seed, self.noise_draws = 0, 0  # dropout masks: drawn from (seed, draw number)
        self.batchnorms = [n.name for n in tracer.graph.ops if n.kind == "batchnorm2d"]
        self.batches_tracked = 0  # steps taken in training: PyTorch's num_batches_tracked per call of a batch norm
        self.bn_calls = tracked_calls(tracer.graph.ops)  # batch norm (state_dict name) → calls per step
        self.nan_guard = False  # stop at the first non-finite loss or value, naming the stage
        self.epoch = 0  # epochs completed by fit (a loaded checkpoint continues from here)
        self.callbacks, self.history, self.stop_training = [], {}, False
        self.distributed = None  # data-parallel over MPI: a `cnncompile.distributed.Reducer`

    # ----- parameters -------------------------------------------------------------------------
    @property
    def graph_ir(self):
        return self.tracer.graph

    def reset_parameters(self, seed: int = 0) -> None:
        """PyTorch's default initialisation, drawn layer by layer in state_dict order from ``seed``."""
        rng = np.random.default_rng(seed)
        done = set()
        saved = set(self.prog.state_names)
        for name in self.prog.state_names:
            layer, _ = self.tracer.param_owner[name]
            if id(layer) in done:
                continue
            done.add(id(layer))
            tensors = {local: t for t, (owner, local) in self.tracer.param_owner.items()
                       if owner is layer and t in saved}
            values = layer.init_params(rng, {local: self.prog.tensors[t].shape for local, t in tensors.items()})
            for local, t in tensors.items():
                self.executable.state[t][...] = values[local]
        for name, spec in self.prog.tensors.items():
            if spec.role == "state":
                self.executable.state[name][...] = 0
        self.step, self.noise_seed, self.noise_draws, self.batches_tracked = 0, seed, 0, 0

    def _counter_names(self) -> list[str]:
        return [f"{bn}.num_batches_tracked" for bn in self.batchnorms]

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Parameters and buffers by PyTorch's names and in its order (copies)."""
        out = OrderedDict()
        for n in self.prog.state_names:
            out[n] = self.executable.state[n].copy()
            if n.endswith(".running_var"):  # PyTorch puts the counter after the running statistics
                out[n[: -len("running_var")] + "num_batches_tracked"] = np.array(
                    self.batches_tracked * self.bn_calls.get(n[: -len(".running_var")], 1), np.int64)
        return out

    def named_parameters(self):
        """(name, array) for every trainable parameter, as PyTorch's ``named_parameters``: the live
        arrays the compiled code reads and updates (writing into one changes the model)."""
        return [(n, self.executable.state[n]) for n in self.prog.params]

    def parameters(self):
        """The live parameter arrays, as PyTorch's ``parameters()`` (see `named_parameters`)."""
        return [p for _, p in self.named_parameters()]

    def __call__(self, x):
        """``model(x)``: `predict`, as calling a PyTorch module in eval mode."""
        return self.predict(x)

    def to_torch_state_dict(self):
        """`state_dict` as torch tensors, so ``torch_module.load_state_dict(model.to_torch_state_dict())``
        puts trained weights back into the module the model was compiled from (needs torch)."""
        from .frontends.torch_fx import to_torch_state_dict
        return to_torch_state_dict(self)

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        names = self.prog.state_names
        counters = [c for c in self._counter_names() if c in state]
        missing = [n for n in names if n not in state]
        unexpected = [k for k in state if k not in names and k not in self._counter_names()]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}; "
                           f"expected exactly {names}")
        arrays = {}
        for n in names:
            if n not in state:
                continue
            value = _numpy(state[n])
            want = self.executable.state[n].shape
            if value.shape != want:
                raise ValueError(f"load_state_dict: '{n}' has shape {value.shape} in the given state, "
                                 f"but the model's is {want}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"load_state_dict: '{n}' contains NaN or Inf")
            arrays[n] = value
        for n, value in arrays.items():  # all checked first: a bad entry changes nothing
            self.executable.state[n][...] = value
        if counters:
            self.batches_tracked = int(_numpy(state[counters[0]])) // self.bn_calls.get(
                counters[0][: -len(".num_batches_tracked")], 1)

    # ----- running ----------------------------------------------------------------------------
    def train(self, mode: bool = True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def _feeds(self, x, y):
        x = validate.as_batch(x, self.input_shape, self.dtype)
        feeds = {"input": x}
        if self.loss is None:
            raise CompileError("this model was compiled without a loss: pass loss=... to cc.compile")
        keys = [k for k, _ in self.heads]
        if isinstance(y, dict) and keys != [None] and set(keys) - set(y):
            raise KeyError(f"no target for head(s) {sorted(set(keys) - set(y))}; give a dict with keys {keys}")
        targets = [y] if keys == [None] else [y[k] for k in keys] if isinstance(y, dict) else list(y)
        if len(targets) != len(keys):
            raise ValueError(f"expected {len(keys)} targets (one per head {keys}), got {len(targets)}")
        from .compiler import per_head
        for (key, pred), fn, target, name in zip(self.heads, per_head(self.loss, self.heads, "loss"), targets,
                                                 self.prog.labels):
            what = "target" if key is None else f"target for head {key!r}"
            feeds[name] = fn.prepare_target(target, len(x), pred.shape, self.dtype, what)
        return x, feeds

    def noise(self, batch: int, draw: int | None = None, rows: tuple | None = None) -> dict:
        """Dropout masks for one training batch: 0 or 1/(1−p), drawn from (seed, draw number),
        so a run is reproducible and a resumed run draws what the uninterrupted one would.
        ``rows=(first, total)``: the masks of rows first.. of a global batch of ``total`` (a
        rank's share: the same masks whatever the number of ranks)."""
        first, total = rows if rows is not None else (0, batch)
        if draw is None:
            draw, self.noise_draws = self.noise_draws, self.noise_draws + 1
        if not self.prog.noise:
            return {}
        rng = np.random.default_rng([self.noise_seed, draw])
        masks = {}
        for name, p in self.prog.noise.items():
            shape = (total, *self.prog.tensors[name].shape[1:])
            keep = rng.random(shape, dtype=np.float32)[first:first + batch] >= p
            masks[name] = keep.astype(self.dtype) * (self.dtype.type(1.0 / (1.0 - p)) if p < 1 else 0)
        return masks

    def _mode_phase(self, phase: str, training: bool, feeds: dict, batch: int) -> str:
        if not training:
            return f"{phase}_eval"
        if self.batchnorms:
            validate.batch_statistics(batch, self.prog, self.batchnorms)
        feeds.update(self.noise(batch))
        return phase

    def train_step(self, x, y) -> float:
        """One fused forward + backward + update on a batch (always in training mode: batch
        statistics, dropout on); returns the loss before the update."""
        return self._train_step(x, y)[0]

    def require_optimizer(self, where: str) -> None:
        if self.optimizer is None:
            raise CompileError(f"{where}: this model was compiled without an optimizer, so it cannot train: "
                               f"pass optimizer=cc.optim.SGD(lr=...) (or Adam) to cc.compile")

    def _train_step(self, x, y):
        """The loss and each head's output (before the update, copies), for fit's running metrics."""
        self.require_optimizer("train_step")
        if self.distributed is not None:  # every rank holds the global batch and trains on its rows
            return self.distributed.global_step(self, x, y)
        x, feeds = self._feeds(x, y)
        with self.executable.lock:  # (the step counter and dropout draws too)
            phase = self._mode_phase("train", True, feeds, len(x))
            scalars = {**self.optimizer.scalars(self.step + 1), **counter_scalars(self.bn_calls, self.batches_tracked)}
            saved = {n: a.copy() for n, a in self.executable.state.items()} if self.nan_guard else None
            env = self.executable.run(phase, len(x), feeds, scalars)
            loss = float(env[self.prog.loss_name][0])
            self.last_head_losses = self.head_losses(env)  # for fit's per-head history
            outputs = [env[t.name].copy() for _, t in self.heads]
            if saved is not None and not (np.isfinite(loss) and all(np.isfinite(a).all() for a in
                                                                      self.executable.state.values())):
                self._report_nonfinite(saved, phase, len(x), scalars)
            self.step += 1
            self.batches_tracked += 1
        return loss, outputs

    def _report_nonfinite(self, saved: dict, phase: str, batch: int, scalars: dict):
        """Restore the state from before the step, replay it one kernel (fused stages) at a time,
        and name the first stage whose output is not finite."""
        def restore():
            for n, a in saved.items():
                self.executable.state[n][...] = a

        restore()
        culprit = None
        for j, stages in enumerate(self.executable.units(phase)):  # stages, or kernels of fused stages
            env = self.executable.run_unit(phase, j, batch, scalars)
            unstored = getattr(self.executable, "elided", ())  # (values the fused code keeps in registers)
            culprit = next((s for s in stages if s.out not in unstored and env[s.out].dtype.kind == "f"
                            and not np.isfinite(env[s.out]).all()), None)
            if culprit is not None:
                break
        restore()
        from .explain import format_stage
        where = ("no single stage (inputs or parameters were already non-finite)" if culprit is None else
                 f"stage '{culprit.out}' ({culprit.role} of layer '{culprit.layer}'): "
                 f"{format_stage(culprit, {})}")
        raise FloatingPointError(f"NaN guard: step {self.step + 1} produced a non-finite value, first in {where}. "
                                 f"The parameters are left as they were before this step; lower the learning "
                                 f"rate or check the data")

    def head_losses(self, env) -> dict:
        """Each head's own loss (``cls_loss``, ``box_loss``; ``head0_loss`` for a tuple) read from a
        phase's results, on a network of several heads; {} for one head."""
        if len(self.heads) < 2:
            return {}
        outputs = {n.name: n.output for n in self.tracer.graph.ops}
        return {(f"{key}_loss" if isinstance(key, str) else f"head{key}_loss"): float(env[outputs[f"loss.{key}"]][0])
                for key, _ in self.heads}

    def classification_head(self):
        """Index of the first head trained with cross-entropy (for accuracy), or None."""
        from .compiler import per_head
        if self.loss is None:
            return None
        kinds = [fn.kind for fn in per_head(self.loss, self.heads, "loss")]
        return kinds.index("cross_entropy") if "cross_entropy" in kinds else None

    def head_target(self, y, k: int):
        """Head ``k``'s part of a target given as one array, a tuple, or a dict."""
        key = self.heads[k][0]
        return y if key is None else y[key]

    def evaluate(self, x, y, batch_size: int = 256) -> dict:
        """Loss and (for a classifier) accuracy in eval mode, in chunks of ``batch_size``."""
        from cnncompile.training.data.synthetic import take
        if self.distributed is not None:  # each rank evaluates its rows, the sums are added up
            return self.distributed.evaluate(self, x, y, batch_size)
        batch_size = validate.batch_size(batch_size, "evaluate")
        x = validate.as_batch(x, self.input_shape, self.dtype)
        y = validate.targets(y, self.heads)
        validate.same_rows(x, y, self.heads, "evaluate")
        head = self.classification_head()
        total, correct, heads = 0.0, 0, {}
        for start in range(0, len(x), batch_size):
            idx = slice(start, start + batch_size)
            xb, feeds = self._feeds(x[idx], take(y, idx))
            with self.executable.lock:
                env = self.executable.run("loss_eval", len(xb), feeds)
                loss = float(env[self.prog.loss_name][0])
                out = None if head is None else env[self.heads[head][1].name].copy()
                for k, v in self.head_losses(env).items():
                    heads[k] = heads.get(k, 0.0) + v * len(xb)
            total += loss * len(xb)
            if out is not None:
                correct += int((out.argmax(1) == self.head_target(take(y, idx), head)).sum())
        metrics = {"loss": total / len(x)} | {k: v / len(x) for k, v in heads.items()}
        if head is not None:
            metrics["accuracy"] = correct / len(x)
        return metrics

    def loss_and_grads(self, x, y):
        """Loss and every parameter's gradient, keyed like state_dict; nothing is updated (not
        even running statistics). Uses the mode set by ``train()``/``eval()``."""
        x, feeds = self._feeds(x, y)
        with self.executable.lock:
            env = self.executable.run(self._mode_phase("grads", self.training, feeds, len(x)), len(x), feeds)
            grads = OrderedDict((n, env[grad_name(n)].copy()) for n in self.prog.params)
            return float(env[self.prog.loss_name][0]), grads

    def input_gradient(self, x, y) -> np.ndarray:
        """∂L/∂x for every example (compiled with ``input_grad=True``): what the derivation
        transposes all the way to the image, a saliency map; nothing is updated."""
        if not self.prog.grad_inputs:
            raise CompileError("input_gradient needs the input's gradient derived: compile with input_grad=True")
        x, feeds = self._feeds(x, y)
        with self.executable.lock:
            env = self.executable.run(self._mode_phase("grads", self.training, feeds, len(x)), len(x), feeds)
            return env[grad_name(self.prog.grad_inputs[0])].copy()

    def evaluate_loss(self, x, y) -> float:
        x, feeds = self._feeds(x, y)
        with self.executable.lock:
            env = self.executable.run(self._mode_phase("loss", self.training, feeds, len(x)), len(x), feeds)
            return float(env[self.prog.loss_name][0])

    def predict(self, x, batch_size: int = 256):
        """The network's output(s) in eval mode, computed in chunks of ``batch_size``."""
        batch_size = validate.batch_size(batch_size, "predict")
        x = validate.as_batch(x, self.input_shape, self.dtype)
        parts = []
        for start in range(0, len(x), batch_size):
            chunk = x[start:start + batch_size]
            with self.executable.lock:
                env = self.executable.run("predict", len(chunk), {"input": chunk})
                parts.append([env[t.name].copy() for _, t in self.heads])
        outs = [np.concatenate([p[k] for p in parts]) for k in range(len(self.heads))]
        keys = [k for k, _ in self.heads]
        if keys == [None]:
            return outs[0]
        return dict(zip(keys, outs)) if isinstance(keys[0], str) else tuple(outs)

    def memory_report(self, batch_size: int) -> dict:
        """Bytes held for a batch size: parameters and optimizer/running state, and the working
        tensors of the buffer plan (activations, gradients) as laid out (shared where lifetimes
        allow, on the LLVM backend) and as they would be each in its own memory. ``kept_*``: what
        the model holds now between calls: working memory (LLVM: one arena per sharing mode, sized
        for the largest batch seen, smaller batches run inside it; NumPy: the buffers of the last
        few batch sizes) and the batch sizes whose buffers are ready."""
        batch_size = validate.batch_size(batch_size, "memory_report")
        plan = self.executable.plan(batch_size)
        kept = self.executable.kept()
        return {"state_bytes": sum(a.nbytes for a in self.executable.state.values()),
                "work_bytes": plan.arena_bytes, "work_bytes_unshared": plan.unshared_bytes,
                "kept_bytes": kept["bytes"], "kept_arenas": kept["arenas"], "kept_batch_sizes": kept["batch_sizes"]}

    def __repr__(self):
        return (f"<cnncompile model: {len(self.prog.params)} parameter tensors, backend={self.executable.name}, "
                f"optimizer={self.optimizer!r}>")

    # ----- showing ----------------------------------------------------------------------------
    def explain(self, layer=None, latex: bool = False, notation: str = "code") -> str:
        """The forward stages and the derived backward stages of a layer (or of all), as run;
        ``latex=True``: a whole LaTeX document; ``notation="lecture"``: z(l, n, x, y), w_l, dDiv/dz."""
        from .explain import explain
        return explain(self, layer, latex, notation)

    def schedule(self, phase: str | None = None) -> str:
        """How the LLVM backend runs each phase: per kernel its fused stages, loop order, template,
        vector width, blocking and the threads' split (read from the scheduler, not from the code),
        for the target this model's code was written for."""
        from .schedule_text import schedule
        return schedule(self.prog, phase, self.dtype, getattr(self.executable, "target", None),
                        getattr(self.executable, "choices", None))  # (a tuned model's choices)

    def fit(self, train, epochs: int = 1, batch_size: int = 64, validation=None, callbacks=(), seed: int = 0,
            verbose=True, augment=None, nan_guard=None):
        """Train on ``train = (x, y)`` for ``epochs`` more epochs; returns the history (loss, accuracy,
        val_loss, val_accuracy, lr, seconds per epoch). See `cnncompile.training.fit.fit`."""
        from .training.fit import fit
        return fit(self, train, epochs, batch_size, validation, callbacks, seed, verbose, augment,
                   nan_guard=nan_guard)

    def save(self, path) -> None:
        """Checkpoint: weights, optimizer and schedule state, epoch, RNG counters, the network.
        Distributed, rank 0 alone writes (every rank holds the same state)."""
        from .training.checkpoint import save
        if self.distributed is not None and self.distributed.rank != 0:
            return
        save(self, path)

    def summary(self) -> str:
        """A table: layer, output shape, parameters, MACs, receptive field (size, jump, start)."""
        from .summary import summary
        return summary(self)

    def graph(self, path=None) -> str:
        """The graph IR as DOT text; with ``path`` also written there (``.png`` draws it, else DOT)."""
        from .training import pictures as show
        dot = show.graph_dot(self)
        if path is not None:
            if str(path).endswith(".png"):
                show.save_graph(self, path)
            else:
                with open(path, "w") as f:
                    f.write(dot)
        return dot

    def export_onnx(self, path, opset: int = 17) -> None:
        """The inference graph (eval mode) with the current weights as an ONNX file; needs ``onnx``."""
        from .onnx_export import export
        export(self, path, opset)

    def source(self, kind: str = "llvm") -> str:
        """The generated code: "llvm" (IR as generated), "asm" (after O3, this CPU), or "numpy"."""
        from cnncompile.backends import sources
        return sources.render(self.prog, kind, self.dtype, self.executable)
