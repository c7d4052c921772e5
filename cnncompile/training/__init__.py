"""Training around a compiled model: the fit loop, callbacks, checkpoints, augmentation, data and pictures.

This package sits on top of the compiler: it imports ``cnncompile.model`` and ``cnncompile.compiler``, and no
compiler module (``nn``, ``ir``, ``backends``, ``compiler``, ``optim``) imports it. ``Model``'s training methods
(``fit``, ``save``, ``show_*``) reach it lazily, inside the method, so compiling a network never loads it.
The public names stay at the top level (``cc.load``, ``cc.callbacks``, ``cc.Augment``, ``cc.data``).
"""
