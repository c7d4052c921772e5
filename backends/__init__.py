"""Backends run a `Program` of stages: NumPy (reference, fallback) and LLVM."""
