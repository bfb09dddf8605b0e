"""Calibrated quantization: Hessians of layer inputs, GPTQ, AWQ's scales, the model objective's target, scale
refits, and the text to calibrate on.

Nothing here prints; the CLI and the models call it.
"""

from .awq import InputStats
from .awq import search_scale
from .data import calibration_texts
from .gptq import gptq
from .hessian import Hessian
from .hessian import hessian_loss
from .refit import refit_scales
from .target import CrossMoment
from .target import model_loss
from .target import model_target

__all__ = [
    "Hessian",
    "hessian_loss",
    "gptq",
    "InputStats",
    "search_scale",
    "CrossMoment",
    "model_target",
    "model_loss",
    "refit_scales",
    "calibration_texts",
]
