"""The one error class npquant raises for every user error."""

__all__ = ["NpquantError"]


class NpquantError(ValueError):
    """A user error: bad argument, bad array, bad file.

    The message names the argument or tensor, what was expected and what
    arrived. Being a ``ValueError``, it is caught by code that already
    handles bad values.
    """
