"""Backend primitive sets, one module per array library, imported on first use by
:func:`portable_bn._dispatch.primitives` (each module imports its library). Each module
exposes ``primitives_for(xp, x)``, overrides what its library does faster than the pure
array-API primitives of :class:`portable_bn._primitives.Primitives`, and says why."""
