"""The exceptions users see. Every message names the layer, the shapes and what to change."""


class CompileError(ValueError):
    """A network that cannot be compiled as written."""


class ShapeError(CompileError):
    """Shapes that do not fit together at some layer."""


def where(node) -> str:
    """How an error names a layer: its state_dict name and its type."""
    return f"layer '{node.name}' ({node.type})"
