"""Names shared by the code generator and the runtime (which must not import the generator)."""

UNITS_PHASE = "train"  # the phase whose kernels can also be run one at a time
