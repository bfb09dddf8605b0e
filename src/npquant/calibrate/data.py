"""Calibration text: the built-in set (shipped with npquant) or a user's file.

The built-in set is 600-odd varied English sentences (questions,
instructions, news, technical, conversational, short and long, a few in
other languages and casual spellings). None of them is in ``npquant eval``'s
evaluation set (:data:`npquant.fidelity.SENTENCES`); a test checks it.
"""

from __future__ import annotations

from importlib import resources

from .._checks import stat_text_file
from ..errors import NpquantError

__all__ = ["calibration_texts", "read_text_lines", "MAX_TEXT_BYTES"]

#: Largest text file read whole: calibration takes hundreds of sentences, not gigabytes.
MAX_TEXT_BYTES = 64 << 20


def read_text_lines(path, what: str = "--calibration", max_lines: int | None = None) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped (the first ``max_lines`` of them, if given).

    Refused before opening: a missing path, a directory, and anything that is
    not a regular file (a FIFO would block, a device never end). Refused
    while reading: a file that is not UTF-8, one with no text, and one over
    :data:`MAX_TEXT_BYTES` unless ``max_lines`` stops the reading first.
    """
    st = stat_text_file(path, what, "give a UTF-8 text file, one text per line")
    too_big = NpquantError(f"{what} {path} holds over {MAX_TEXT_BYTES >> 20} MiB of text; a few hundred texts "
                           f"are plenty: pass a smaller file, or fewer texts (max_samples, --max-samples)")
    if max_lines is None and st.st_size > MAX_TEXT_BYTES:
        raise too_big
    texts: list[str] = []
    read = 0  # characters read so far: bounds memory where a FIFO-like stream or a growing file has no size
    try:
        with open(path, encoding="utf-8") as f:
            while max_lines is None or len(texts) < max_lines:
                line = f.readline(MAX_TEXT_BYTES - read + 1)  # one huge line is never read whole
                if not line:
                    break
                read += len(line)
                if read > MAX_TEXT_BYTES:
                    raise too_big
                if line.strip():
                    texts.append(line.strip())
    except OSError as exc:
        raise NpquantError(f"{what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise NpquantError(f"{what} {path} is not UTF-8 text: {exc.reason}") from None
    if not texts:
        raise NpquantError(f"{what} {path} holds no text (one text per line, blank lines skipped)")
    return texts


def calibration_texts(path=None, max_samples: int | None = None) -> list[str]:
    """Calibration texts: ``path`` (UTF-8, one per line) or the built-in set; the first ``max_samples``.

    A bad file (missing, not a regular file, not UTF-8, empty, too large) is
    refused here, before any model is loaded or run.

    >>> len(calibration_texts()) >= 512, len(calibration_texts(max_samples=8))
    (True, 8)
    """
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise NpquantError(f"max_samples must be a positive int, got {max_samples!r}")
    if path is None:
        text = resources.files("npquant").joinpath("data/calibration.txt").read_text(encoding="utf-8")
        texts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        texts = read_text_lines(path, max_lines=max_samples)
    return texts[:max_samples] if max_samples is not None else texts
