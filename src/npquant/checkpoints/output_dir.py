"""Where a quantized checkpoint goes: the checks on OUT, the temporary directory beside it, and its marker.

The writer builds its output in a hidden temporary directory beside OUT,
``.<OUT name>.tmp-<pid>-<random>``, and renames it to OUT once complete.
Three rules keep this from destroying anything the user had:

- **The input is never a target.** OUT equal to, inside, or containing the
  input model (the path given, and every file it reads through symbolic
  links, all resolved) is refused, ``force`` or not.
- **Only npquant's own output is replaced.** Every output directory holds
  :data:`MARKER`, ``.npquant-output.json``: ``{"written_by": "npquant",
  "complete": true, "files": [...]}``, the top-level names the run wrote.
  ``force`` replaces an existing OUT only when it is a directory (not a
  symbolic link) whose marker says so and which holds nothing beyond those
  names (or an empty directory). A regular file, someone else's directory,
  or npquant's with files added is refused with a line saying what is there.
- **A killed run is cleaned up by the next one.** The running writer holds
  an exclusive ``flock`` on the marker inside its temporary directory (the
  kernel drops it when the process dies, SIGKILL included). The next run
  writing beside it removes every ``.*.tmp-<pid>-*`` directory there that
  holds the marker (or nothing) and whose lock it can take; one still locked
  belongs to a live run and is left alone, and so is a moved-aside old OUT
  (``.<OUT name>.old-<pid>-*``) whose OUT is missing. Each is reported.

Nothing here prints: :func:`clean_stale` returns its notes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import NpquantError

__all__ = ["MARKER", "check_output", "check_parent", "clean_stale", "OutputLock", "npquant_version"]

#: The marker file in every directory npquant writes (and in its temporary directories, locked while in use).
MARKER = ".npquant-output.json"
# The marker's name until it is locked: a directory holding only this is judged by its pid.
_PENDING = MARKER + ".new"
# A temporary (tmp) or moved-aside (old) directory of the writer: .<out name>.<kind>-<pid>-<random>.
_TEMP_NAME = re.compile(r"^\.(?P<out>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
# A marker larger than this is not npquant's (it writes a few hundred bytes).
_MARKER_MAX_BYTES = 1 << 20


def npquant_version() -> str | None:
    """The installed npquant's version, or None when it is run from a source tree without metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("npquant")
    except PackageNotFoundError:
        return None


# --- checks before any work ----------------------------------------------------------
def check_parent(path: Path, what: str) -> Path:
    """Refuse ``path`` whose parent is missing, is a file, or cannot be written; return the parent.

    ``what`` names the path in the message (``"output"``, ``"plan"``).
    """
    parent = Path(os.path.abspath(path)).parent
    if not parent.is_dir():
        probe = parent
        while not os.path.lexists(probe) and probe != probe.parent:
            probe = probe.parent
        if os.path.lexists(probe) and not probe.is_dir():
            raise NpquantError(f"cannot write {what} {path}: {probe} is a file, not a folder")
        raise NpquantError(f"cannot write {what} {path}: the folder {parent} does not exist; create it first")
    try:  # os.access says yes to root on a read-only mount: make and remove a directory instead
        os.rmdir(tempfile.mkdtemp(prefix=".npquant-probe-", dir=parent))
    except OSError as exc:
        raise NpquantError(f"cannot write {what} {path}: {parent} is not writable ({_reason(exc)})") from None
    return parent


def check_output(model: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse an ``out`` the writer must not write or replace; return it as a Path.

    Cheap (no tensor is read): call it before any long work. Refused, as
    :class:`NpquantError`: ``out`` equal to, inside or containing the input
    model (even with ``force``); a parent that is missing, a file, or not
    writable; an existing ``out`` without ``force``; with ``force``, an
    ``out`` that is not a directory npquant wrote (see the module notes).
    """
    out = Path(out)
    _check_not_input(Path(model), out)
    check_parent(out, "output")
    problem = existing_output_problem(out, force)
    if problem:
        raise NpquantError(problem)
    return out


def existing_output_problem(out: Path, force: bool) -> str | None:
    """Why an existing ``out`` may not be replaced (a one-line message), or None when it may (or is absent)."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot write output {out}: {_reason(exc)}"
    import stat

    if stat.S_ISLNK(st.st_mode):
        return (f"output {out} is a symbolic link (to {os.readlink(out)}); npquant does not replace links, "
                f"even with --force: remove it or choose another OUT")
    if not stat.S_ISDIR(st.st_mode):
        return (f"output {out} is a file, not a directory npquant wrote; npquant never replaces it, even with "
                f"--force: remove it yourself or choose another OUT")
    if not force:
        return f"output {out} already exists; pass --force to replace it (only a directory npquant wrote is replaced)"
    reason = _not_npquant_output(out)
    if reason:
        return (f"output {out} {reason}; --force replaces only a directory npquant wrote: remove it yourself "
                f"or choose another OUT")
    return None


def _not_npquant_output(out: Path) -> str | None:
    """None when ``out`` is npquant's complete output (or empty); else what is there, as a phrase."""
    try:
        names = set(os.listdir(out))
    except OSError as exc:
        return f"cannot be read ({_reason(exc)})"
    if not names:
        return None
    if MARKER not in names:
        return f"is a directory npquant did not write (it holds {_some(names)} and no {MARKER})"
    marker = _read_marker(out / MARKER)
    if marker is None or not marker.get("complete") or not isinstance(marker.get("files"), list):
        return f"holds a {MARKER} that is not a complete npquant output's"
    extra = names - {MARKER} - {f for f in marker["files"] if isinstance(f, str)}
    if extra:
        return f"holds {_some(extra)}, which npquant did not write there"
    return None


def _read_marker(path: Path) -> dict | None:
    """The marker's JSON when it is a small regular file written by npquant, else None."""
    import stat

    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MARKER_MAX_BYTES:
            return None
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == "npquant" else None


def _some(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return f"{names[0]!r}{more}"


def _check_not_input(model: Path, out: Path) -> None:
    """Refuse ``out`` equal to, inside or containing the model or any file it reads (symbolic links followed)."""
    out_real = out.resolve()
    model_real = model.resolve()
    inputs = [model_real]
    if model_real.is_dir():
        try:
            entries = list(os.scandir(model_real))
        except OSError:
            entries = []
        inputs += [Path(e.path).resolve() for e in entries if e.is_symlink()]  # e.g. a hub cache's blobs
    for src in inputs:
        if out_real == src:
            raise NpquantError(f"output {out} is the input model {model}; npquant never writes over its input, "
                               f"even with --force: choose another OUT")
        if src in out_real.parents:
            raise NpquantError(f"output {out} is inside the input model {model} ({src}); npquant never writes "
                               f"into its input, even with --force: choose an OUT outside it")
        if out_real in src.parents:
            raise NpquantError(f"output {out} contains the input model {model} ({src}); replacing it would "
                               f"destroy the input, even with --force: choose another OUT")


# --- the temporary directory and its lock --------------------------------------------
class OutputLock:
    """The marker file of a directory being written, held under an exclusive ``flock`` while open.

    ``OutputLock.create(parent, out_name, kind)`` makes ``.<out_name>.<kind>-<pid>-<random>``
    in ``parent`` with the marker inside, locked; :meth:`finish` writes the
    final marker (the top-level names of the directory); :meth:`close`
    releases the lock (the kernel also does when the process dies).
    """

    def __init__(self, directory: Path, fd: int):
        self.directory = directory
        self._fd = fd

    @classmethod
    def create(cls, parent: Path, out_name: str, kind: str = "tmp") -> "OutputLock":
        directory = Path(tempfile.mkdtemp(prefix=f".{out_name}.{kind}-{os.getpid()}-", dir=parent))
        try:
            fd = os.open(directory / _PENDING, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        lock = cls(directory, fd)
        try:
            _flock(fd)
            lock._write({"written_by": "npquant", "complete": False, "pid": os.getpid()})
            os.rename(directory / _PENDING, directory / MARKER)  # the marker exists only locked
        except BaseException:
            lock.close()
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return lock

    def finish(self, **fields) -> None:
        """Write the complete marker: npquant's version, the top-level names beside it, and ``fields``."""
        files = sorted(n for n in os.listdir(self.directory) if n != MARKER)
        self._write({"written_by": "npquant", "version": npquant_version(), "complete": True, **fields,
                     "files": files})

    def _write(self, data: dict) -> None:
        raw = (json.dumps(data, indent=2) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, raw, 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _flock(fd: int) -> None:
    """Take an exclusive lock on ``fd``; where the filesystem has no locks, go on without one."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        # ENOLCK, EOPNOTSUPP: no locks here; the next run will then report the directory instead of removing it


def _owner_gone(marker: Path) -> bool | None:
    """True when no live process holds the marker's lock, False when one does, None when it cannot be told."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(marker, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return False if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
    finally:
        os.close(fd)  # also releases the lock just taken
    return True


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, another user's
        return True
    return True


def clean_stale(parent: Path) -> list[str]:
    """Remove npquant's temporary directories in ``parent`` left by runs that were killed; one note for each.

    A directory qualifies only by its name (``.<name>.tmp-<pid>-<random>`` or
    ``.<name>.old-<pid>-<random>``), being a real directory, holding npquant's
    marker or nothing at all, and no live process holding the marker's lock.
    A moved-aside old output (``.old-``) whose OUT is missing is reported,
    never removed: it is the only copy left.
    """
    import stat

    notes = []
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return notes
    for name in entries:
        m = _TEMP_NAME.match(name)
        if not m:
            continue
        path = parent / name
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
            inside = set(os.listdir(path))
        except OSError:
            continue
        if MARKER in inside:
            gone = _owner_gone(path / MARKER)
        elif inside <= {_PENDING}:  # killed before its marker was locked: the pid is all there is
            gone = not _pid_alive(int(m["pid"]))
        else:
            continue  # not npquant's
        if gone is False:
            notes.append(f"left alone {path}: a running npquant (pid {m['pid']}) is writing it")
            continue
        if gone is None:
            notes.append(f"left alone {path}, npquant's temporary directory from an earlier run: this filesystem "
                         f"cannot tell whether that run is still going; remove it once it is not")
            continue
        if m["kind"] == "old" and "old" in inside and not os.path.lexists(parent / m["out"]):
            notes.append(f"left alone {path}: its 'old' folder is the previous {parent / m['out']}, moved aside by a "
                         f"run that was stopped; move it back or remove it")
            continue
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):
            notes.append(f"could not remove {path}, left by an npquant run that was stopped; remove it yourself")
        else:
            notes.append(f"removed {path}, left by an npquant run that was stopped")
    return notes


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
