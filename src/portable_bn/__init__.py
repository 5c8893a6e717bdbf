"""PyTorch-exact batch normalization on every array-API library."""

from . import distributed as distributed
from ._files import load, save
from ._fold import fold, fuse_conv, fuse_linear
from ._functional import BatchNormResult, batch_norm, batch_norm_backward
from ._modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, IncompatibleKeys
from ._recalibrate import recalibrate

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormResult",
    "IncompatibleKeys",
    "__version__",
    "batch_norm",
    "batch_norm_backward",
    "fold",
    "fuse_conv",
    "fuse_linear",
    "load",
    "recalibrate",
    "save",
]
