"""What a phase runs on, for every backend: buffers by tensor name and the runtime scalars."""
from __future__ import annotations


class Env(dict):
    """Buffers by tensor name, plus the runtime scalars (batch size, learning rate, ...)."""

    def __init__(self, *args, scalars=None):
        super().__init__(*args)
        self.scalars = scalars if scalars is not None else {}
