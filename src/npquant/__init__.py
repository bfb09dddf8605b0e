"""npquant: weight quantization for numpy.

Quantize a weight ``w (out_features, in_features)`` to int2..int8 (packed) or
fp8, per tensor, channel or group, measure what it saves and costs, and run
the quantized linear layer without building the float32 weight.

>>> import numpy as np, npquant
>>> w = np.random.default_rng(0).standard_normal((128, 256)).astype(np.float32)
>>> qt = npquant.quantize(w, "w4-g64")
>>> qt.bits_per_weight
4.5
>>> npquant.linear(np.ones(256, np.float32), qt).shape
(128,)
"""

__version__ = "0.1.0"

from . import metrics
from .calibrate import Hessian
from .calibrate import gptq
from .calibrate import hessian_loss
from .checkpoints import load
from .checkpoints import quantize_checkpoint
from .checkpoints.convert import convert_gguf
from .errors import NpquantError
from .lab import dequantize
from .lab import memory_bytes
from .lab import memory_bytes_quant
from .lab import quant_linear
from .lab import quantize_per_channel
from .lab import quantize_per_tensor
from .linear import available_backends
from .linear import linear
from .prepared import PreparedTensor
from .prepared import PreparedW8A8
from .prepared import prepare
from .quantize import QuantizedTensor
from .quantize import quantize
from .quantize import quantize_measured
from .schemes import Scheme
from .schemes import get_scheme
from .schemes import schemes

__all__ = [
    # the engine
    "Scheme",
    "schemes",
    "get_scheme",
    "quantize",
    "quantize_measured",
    "QuantizedTensor",
    "linear",
    "available_backends",
    "prepare",
    "PreparedTensor",
    "PreparedW8A8",
    # calibrated quantization
    "gptq",
    "Hessian",
    "hessian_loss",
    # checkpoints
    "quantize_checkpoint",
    "load",
    "convert_gguf",
    # the lab-01 API
    "quantize_per_channel",
    "quantize_per_tensor",
    "dequantize",
    "quant_linear",
    "memory_bytes",
    "memory_bytes_quant",
    # metrics module and errors
    "metrics",
    "NpquantError",
    "__version__",
]
