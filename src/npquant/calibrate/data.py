"""Calibration text: the built-in set (shipped with npquant) or a user's file.

The built-in set is 600-odd varied English sentences (questions,
instructions, news, technical, conversational, short and long, a few in
other languages and casual spellings). None of them is in ``npquant eval``'s
evaluation set (:data:`npquant.fidelity.SENTENCES`); a test checks it.
"""

from __future__ import annotations

from importlib import resources

from ..errors import NpquantError

__all__ = ["calibration_texts", "read_text_lines"]


def read_text_lines(path, what: str = "--calibration") -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; a missing, unreadable or empty file is an error."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError as exc:
        raise NpquantError(f"{what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise NpquantError(f"{what} {path} is not UTF-8 text: {exc.reason}") from None
    texts = [s for s in lines if s]
    if not texts:
        raise NpquantError(f"{what} {path} holds no text (one text per line, blank lines skipped)")
    return texts


def calibration_texts(path=None, max_samples: int | None = None) -> list[str]:
    """Calibration texts: ``path`` (UTF-8, one per line) or the built-in set; the first ``max_samples``.

    >>> len(calibration_texts()) >= 512, len(calibration_texts(max_samples=8))
    (True, 8)
    """
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise NpquantError(f"max_samples must be a positive int, got {max_samples!r}")
    if path is None:
        text = resources.files("npquant").joinpath("data/calibration.txt").read_text(encoding="utf-8")
        texts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        texts = read_text_lines(path)
    return texts[:max_samples] if max_samples is not None else texts
