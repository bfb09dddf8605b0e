"""Quantize safetensors checkpoints into compressed-tensors, and load them back.

- ``config.py``: the scheme <-> compressed-tensors ``quantization_config``
  mapping, both ways, with the targets/ignore matching and
  :func:`check_loadable`;
- ``selection.py``: which tensors of a checkpoint are quantized
  (:func:`select_layers`);
- ``writer.py``: :func:`quantize_checkpoint`, the streaming writer;
- ``reader.py``: :func:`load` and its validation;
- ``output_dir.py``: :func:`check_output`, what OUT may be (never the input;
  ``force`` replaces only npquant's own output), and the temporary directory;
- ``default_model.py``: :func:`default_model_path`, the bundled model.

The writer and the reader each build on ``config.py``; neither imports the
other.
"""

from .config import VLLM_GROUP_SIZES
from .config import check_loadable
from .default_model import DEFAULT_MODEL_PACKAGE
from .default_model import default_model_path
from .output_dir import check_output
from .reader import load
from .selection import LayerChoice
from .selection import refuse_quantized
from .selection import select_layers
from .writer import quantize_checkpoint

__all__ = [
    "LayerChoice",
    "select_layers",
    "refuse_quantized",
    "check_loadable",
    "check_output",
    "quantize_checkpoint",
    "load",
    "default_model_path",
    "DEFAULT_MODEL_PACKAGE",
    "VLLM_GROUP_SIZES",
]
