"""Calibrated quantization: Hessians of layer inputs, GPTQ, and the text to calibrate on.

Nothing here prints; the CLI and the models call it.
"""

from .data import calibration_texts
from .gptq import gptq
from .hessian import Hessian
from .hessian import hessian_loss

__all__ = ["Hessian", "hessian_loss", "gptq", "calibration_texts"]
