"""Strided, dilated and padded windows against PyTorch in float64, both backends, every working
buffer poisoned with NaN: the forward pass, every parameter gradient and the input gradient.
Where stride and dilation share a factor the transposed read is a lattice and some residue
classes of the input gradient receive no term; they must still be written (as zeros)."""
import pytest

from lattice_sweep import compare, describe, sample, valid

BACKENDS = ["numpy", "llvm"]
TOL = 1e-10

# found by checks outside the suite: wrong on LLVM before empty residue classes were zero-filled
REPORTED = {
    (5, 5): [("conv", 3, 2, 0, 2, {}), ("conv", (2, 3), 2, 1, (2, 3), {}), ("conv", (2, 2), 2, 1, 2, {}),
             ("conv", (2, 3), 2, 1, (2, 1), {}), ("conv", 3, 2, 1, 2, {})],
    (13, 14): [("conv", 3, 4, 1, 2, {}), ("conv", 3, 2, 1, 4, {}), ("conv", 3, 6, 1, 2, {}), ("conv", 3, 6, 1, 4, {})],
    (7, 8): [("conv", 3, 4, 0, 2, {}), ("conv", 3, 4, 1, 2, {})],
}


def check(backend, branches, size):
    fwd, grad, dx, name = compare(backend, branches, size)
    what = "; ".join(f"{describe(s)} width {w}" for s, w in branches)
    assert fwd < TOL, f"forward {fwd:.1e} on {size}: {what}"
    assert grad < TOL, f"gradient of {name} {grad:.1e} on {size}: {what}"
    assert dx < TOL, f"input gradient {dx:.1e} on {size}: {what}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", list(REPORTED))
def test_reported_lattice_cases(backend, size):
    specs = [s for s in REPORTED[size] if valid(s, size)]
    assert len(specs) == len(REPORTED[size])
    check(backend, [(s, w) for s in specs for w in (1, 2)], size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(3, 3), (4, 5), (6, 6), (7, 8)])
def test_sampled_geometries(backend, size):
    check(backend, sample(size, 12, seed=size[0] * 31 + size[1]), size)
