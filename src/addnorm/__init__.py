"""addnorm: Add & Norm done right.

Every normalization layer and residual placement Transformers use, as drop-in
replacements for torch.nn, running on the fastest backend for the tensor's device.

    import addnorm
    norm = addnorm.RMSNorm(512)            # a torch.nn.RMSNorm, faster
    y = addnorm.functional.layer_norm(x, (512,), w, b)
    addnorm.backends()                     # {'torch': True, 'numba': ..., 'triton': ...}
    with addnorm.backend("torch"): ...     # force one backend
"""

from . import diagnostics, functional
from ._backend import backend, backends
from .fold import fold_batch_norm
from .patching import patch, unpatch
from .functional import ArgumentError, ArgumentTypeError
from .modules import (
    AddLayerNorm,
    AddRMSNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    DyT,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
    ScaleNorm,
    SyncBatchNorm,
    weight_norm,
)

from .residual import DeepNormCoefficients, Residual, deepnorm_coefficients
from .transformer import Transformer

__version__ = "0.1.0"

__all__ = [
    "functional",
    "diagnostics",
    "backend",
    "backends",
    "ArgumentError",
    "ArgumentTypeError",
    "LayerNorm",
    "RMSNorm",
    "AddLayerNorm",
    "AddRMSNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "GroupNorm",
    "ScaleNorm",
    "DyT",
    "weight_norm",
    "fold_batch_norm",
    "patch",
    "unpatch",
    "Residual",
    "deepnorm_coefficients",
    "DeepNormCoefficients",
    "Transformer",
]
