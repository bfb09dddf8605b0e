"""The sentence encoder users hold: the BERT forward, and :meth:`SentenceEncoder.quantized`.

Quantizing by GPTQ or AWQ runs the model on calibration text through the
sequential driver (:mod:`npquant.models.calibrated`), which takes the model
as an argument. So the method that offers it lives here, above both the
forward (:mod:`npquant.models.bert`, which knows nothing of calibration) and
the driver.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import NpquantError
from ..quantize import quantize
from ..schemes import get_scheme
from ..tensor import QuantizedTensor
from .bert import BertEncoder
from .calibrated import calibrated_tensors

__all__ = ["SentenceEncoder", "METHODS"]

#: How :meth:`SentenceEncoder.quantized` chooses codes.
METHODS = ("rtn", "gptq", "awq", "awq+gptq")


class SentenceEncoder(BertEncoder):
    """Sentence embeddings from a BERT checkpoint, in numpy (:class:`~npquant.models.bert.BertEncoder`), and
    copies of it with quantized linear layers.

    Example (needs the bundled model, so not run as a doctest)::

        enc = SentenceEncoder.from_pretrained()         # all-MiniLM-L6-v2
        enc.encode(["a sentence", "another"]).shape    # (2, 384), float32
        enc.quantized("w4-g128").encode(["a sentence"])
    """

    def quantized(self, scheme, method: str = "rtn", calibration=None, *, observer: str = "minmax",
                  objective: str = "model", progress=None) -> "SentenceEncoder":
        """A copy whose linear layers are :class:`QuantizedTensor` s.

        Parameters
        ----------
        scheme : Scheme, preset name, or a mapping ``{layer name: Scheme or preset}``
            One scheme for every layer of :meth:`linear_names`, or one per
            layer (a plan's; layers it leaves out stay float32).
        method : {"rtn", "gptq", "awq", "awq+gptq"}
            ``"rtn"``: round to nearest (:func:`npquant.quantize`). The others
            are calibrated on ``calibration``, block after block, each block's
            inputs computed with the earlier ones already quantized (see
            :mod:`npquant.models.calibrated`): ``"gptq"``; ``"awq"``, AWQ's
            input scales where they fold into the model, then round to
            nearest; ``"awq+gptq"``, the scales then GPTQ. fp8 layers are
            rounded to nearest. The per-layer losses are in the copy's
            ``layer_report``; with AWQ the copy's float tensors include the
            folded ones (value's weight and bias).
        calibration : list of str or None
            The calibration texts (default: the built-in set,
            :func:`npquant.calibrate.calibration_texts`).
        observer : {"minmax", "mse"}
            How block ranges are chosen (see :mod:`npquant.quantize`).
        objective : {"model", "layer"}
            GPTQ methods: reproduce the float model's output at each layer
            (``"model"``, then scales refitted to the codes) or each layer's
            own output on the inputs it sees (``"layer"``, GPTQ as published).
        progress : callable or None
            Calibrated methods only: ``progress(module, done, total)`` after each layer.
        """
        schemes = self._layer_schemes(scheme)
        if method not in METHODS:
            raise NpquantError(f"method={method!r} is not known; expected one of {METHODS}")
        if any(isinstance(self.tensors[n], QuantizedTensor) for n in self.linear_names()):
            raise NpquantError("this encoder is quantized already; quantize the float32 one")
        report = None
        if method != "rtn":
            tensors, report = calibrated_tensors(self, schemes, calibration, method=method, observer=observer,
                                                 objective=objective, progress=progress)
        else:
            tensors = dict(self.tensors)
            for name, sch in schemes.items():
                tensors[name] = quantize(tensors[name], sch, name=f"tensor {name!r}:", observer=observer)
        uniform = set(schemes.values())
        out = SentenceEncoder(self.config, tensors, self.tokenizer, self.max_seq_length, self.backend,
                              uniform.pop() if len(uniform) == 1 and len(schemes) == len(self.linear_names()) else None)
        out.layer_report = report
        return out

    def _layer_schemes(self, scheme) -> dict:
        """``{layer name: Scheme}`` from one scheme or a per-layer mapping (names checked)."""
        names = self.linear_names()
        if isinstance(scheme, Mapping):
            out = {}
            for name, sch in scheme.items():
                if name not in names:
                    raise NpquantError(f"layer {name!r} is not a linear layer of this encoder (e.g. {names[0]!r})")
                out[name] = get_scheme(sch)
            if not out:
                raise NpquantError("the per-layer scheme mapping is empty")
            return {n: out[n] for n in names if n in out}
        sch = get_scheme(scheme)
        return {n: sch for n in names}
