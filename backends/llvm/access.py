"""Memory accesses and scalar statements: offsets into a tensor, bounds-checked builds, a stage
body at one loop point (a plain loop's statement, an epilogue on one value)."""
from __future__ import annotations

from cnncompile.ir.affine import Affine
from cnncompile.ir.expr import tensor_of

from .emit import FAST, BodyWriter

ELEMENT = {"int": "i64", "index": "i32"}  # integer tensors' LLVM element types (floats: the program's)


class Access:
    """What every loop point needs: where a tensor element is, and the scalar code for a body
    there. Subclasses hold ``prog``, ``ft``, ``checked``, ``scalar_names``, ``tensor_ids`` and
    ``current_stage`` (the stage a bounds-check report names)."""

    def offset(self, fw, tensor, index, vals, shapes):
        shape = shapes[tensor]
        flat = None
        for k, e in enumerate(index):
            stride = 1
            for d in shape[k + 1:]:
                stride *= d
            term = fw.affine(e, vals)
            term = term if stride == 1 else fw.imul(term, stride)
            flat = term if flat is None else fw.iadd(flat, term)
        return flat or "0"

    def address(self, fw, tensor, index, vals, shapes, ptr):
        elem = ELEMENT.get(self.prog.tensors[tensor].dtype, self.ft)
        at = self.offset(fw, tensor, index, vals, shapes)
        if self.checked:
            at = self.checked_offset(fw, tensor, at, shapes)
        return elem, fw.op(f"getelementptr inbounds {elem}, ptr {ptr[tensor]}, i64 {at}", "p")

    def checked_offset(self, fw, tensor, at, shapes) -> str:
        """Bounds-checked mode: an offset outside the buffer is reported (see `report_when`) and
        replaced by 0, so the access stays inside."""
        bad = fw.op(f"icmp uge i64 {at}, {self.tensor_size(fw, tensor, shapes)}")
        self.report_when(fw, bad, tensor, at)
        return fw.op(f"select i1 {bad}, i64 0, i64 {at}")

    @staticmethod
    def tensor_size(fw, tensor, shapes):
        """Elements in ``tensor``'s buffer (an i64 value where the batch extent is in it)."""
        size = 1
        for d in shapes[tensor]:
            size = fw.imul(size, "%B") if d == "B" else (size * d if isinstance(size, int) else fw.imul(size, d))
        return size

    def report_when(self, fw, bad, tensor, at) -> None:
        """Where ``bad`` holds, the access is reported in the scalar block's last four slots
        (stage, tensor, offset, 1): the runtime raises IndexError naming them."""
        base = len(self.scalar_names)

        def report():
            for k, value in enumerate((self.current_stage, self.tensor_ids[tensor], at, 1)):
                slot = fw.op(f"getelementptr inbounds double, ptr %scalars, i64 {base + k}", "p")
                fw.raw(f"store double {fw.op(f'sitofp i64 {value} to double')}, ptr {slot}")

        fw.when(bad, report)

    def store(self, fw, tensor, index, vals, shapes, ptr, value):
        elem, p = self.address(fw, tensor, index, vals, shapes, ptr)
        fw.raw(f"store {elem} {value}, ptr {p}")

    def body_writer(self, fw, vals, shapes, ptr, made=None) -> BodyWriter:
        """Scalar code for a body at the point ``vals``; reads of tensors in ``made`` are those values."""
        def load_read(r):
            if made and tensor_of(r) in made:
                return made[tensor_of(r)], "f"
            index = [Affine.from_sympy(i) for i in r.indices]
            elem, p = self.address(fw, tensor_of(r), index, vals, shapes, ptr)
            value = fw.op(f"load {elem}, ptr {p}")
            if elem == "i32":  # window positions are stored narrow; index arithmetic is i64
                return fw.op(f"sext i32 {value} to i64"), "i"
            return value, ("i" if elem == "i64" else "f")

        def symbol(s):
            if s.name in vals:
                return vals[s.name], "i"
            if s.name == "B":
                return "%B", "i"
            slot = fw.op(f"getelementptr inbounds double, ptr %scalars, i64 {self.scalar_names.index(s.name)}", "p")
            value = fw.op(f"load double, ptr {slot}")
            return (value if self.ft == "double" else fw.op(f"fptrunc double {value} to float")), "f"

        return BodyWriter(fw, load_read, symbol)

    def statement(self, fw, stage, term, out_index, nest, vals, shapes, ptr, accumulate) -> None:
        writer = self.body_writer(fw, vals, shapes, ptr)
        value = writer.as_float(writer.emit(term))
        _, p = self.address(fw, stage.out, out_index, vals, shapes, ptr)
        if stage.combine == "max":
            take, larger = running_max(fw, self.ft, "i1", value, fw.op(f"load {self.ft}, ptr {p}"))
            fw.raw(f"store {self.ft} {larger}, ptr {p}")
            for (r, _), name in zip(stage.reduce, stage.argmax):
                _, ap = self.address(fw, name, out_index, vals, shapes, ptr)
                old = fw.op(f"load i32, ptr {ap}")
                where = fw.op(f"trunc i64 {fw.affine(nest.subst[r], vals)} to i32")
                fw.raw(f"store i32 {fw.op(f'select i1 {take}, i32 {where}, i32 {old}')}, ptr {ap}")
            return
        if accumulate:
            value = fw.op(f"fadd {FAST} {self.ft} {fw.op(f'load {self.ft}, ptr {p}')}, {value}")
        fw.raw(f"store {self.ft} {value}, ptr {p}")

    def scalar_epilogue(self, fw, out, out_index, vals, shapes, ptr, epilogue, value=None) -> None:
        """The epilogue stages at one output point, on the main's finished value (loaded back
        when not given: it was just stored, so it is in L1)."""
        if value is None:
            _, p = self.address(fw, out, out_index, vals, shapes, ptr)
            value = fw.op(f"load {self.ft}, ptr {p}")
        made = {out: value}
        for stage, body in epilogue:
            writer = self.body_writer(fw, vals, shapes, ptr, made)
            made[stage.out] = writer.as_float(writer.emit(body))
            self.store(fw, stage.out, out_index, vals, shapes, ptr, made[stage.out])


def running_max(fw, ty: str, bool_ty: str, value: str, cur: str) -> tuple[str, str]:
    """One step of a max (scalars or vectors): take ``value`` where it is greater, or where it
    is the first NaN; ties keep the earlier value. Returns (taken, the new maximum)."""
    greater = fw.op(f"fcmp ogt {ty} {value}, {cur}")
    first_nan = fw.op(f"and {bool_ty} {fw.op(f'fcmp uno {ty} {value}, {value}')}, {fw.op(f'fcmp ord {ty} {cur}, {cur}')}")
    take = fw.op(f"or {bool_ty} {greater}, {first_nan}")
    return take, fw.op(f"select {bool_ty} {take}, {ty} {value}, {ty} {cur}")
