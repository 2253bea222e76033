"""Output directories: who owns them, and one run at a time in each.

Three promises, all checked before any work:

* ``--out`` is never an input: the student/model or teacher directory a run reads is refused as its output,
  so a run cannot write over the model it is training from;
* a directory adala did not create is left alone: an existing non-empty directory counts as adala's only when
  it holds the marker (:data:`MARKER`, written when a run claims the directory), a run lock, or the files an
  earlier adala run leaves (checkpoints, a finished stage, a recipe's ``stage.json``/``summary.json``);
  anything else is refused unless ``force`` (``--force``), and nothing in it is touched;
* one run per directory: a run holds :data:`LOCK` (pid, host, start time inside) for as long as it writes.
  The lock is an ``flock`` on that file, which the kernel drops when the owner dies, even by SIGKILL, so a
  lock file left behind by a dead run is recognised as stale and taken over; one whose owner is alive makes
  the second run fail at once, naming the owner. Where ``flock`` is not supported the pid is checked instead
  (on this host; a lock from another host is never taken over, since its pid cannot be checked from here).

Under ``torchrun`` only rank 0 takes the lock and writes the marker; the other ranks only check.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError
from .files import atomic_write_text
from .train import distributed as dist

LOCK = ".adala.lock"
METRICS = "metrics.json"  # written last by a finished stage
MARKER = ".adala-out.json"
# Files an earlier adala run leaves in its directory (runs from before the marker existed still resume).
_RUN_FILES = ("checkpoints", "stage.json", "summary.json")

log = logging.getLogger("adala")


def launch_rank() -> int:
    """This process's rank, also before the process group exists (torchrun sets RANK for every worker)."""
    if dist.is_distributed():
        return dist.rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def created_by_adala(d: Path) -> bool:
    """Whether an existing directory is one adala made (see the module docstring for what counts)."""
    if (d / MARKER).is_file() or (d / LOCK).is_file():
        return True
    if any((d / name).exists() for name in _RUN_FILES):
        return True
    return (d / "adala.json").is_file() and (d / "metrics.json").is_file()  # a finished stage


def check_target(out: Path, inputs: Iterable[tuple[str, Any]] = (), *, force: bool = False,
                 flag: str = "--out") -> None:
    """Refuse, in one line and writing nothing, an output that is a file, one of ``inputs`` (``(label, value)``
    pairs; values that are not paths are ignored), a directory adala did not create (unless ``force``), or
    one that cannot be created (read-only or non-directory parent)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} exists and is not a directory")
    for label, value in inputs:
        if isinstance(value, (str, os.PathLike)) and _same(out, Path(value)):
            raise ConfigError(f"{flag} {out} is the {label} directory this run reads; writing there would "
                              "replace it; choose another --out")
    if out.is_dir():
        try:
            empty = not any(out.iterdir())
        except OSError as e:
            raise ConfigError(f"{flag} {out} cannot be read ({e.strerror or e})") from None
        if not force and not empty and not created_by_adala(out):
            raise ConfigError(f"{flag} {out} is a non-empty directory adala did not create; choose an empty or "
                              "new directory (or pass --force / force=True to write into it anyway)")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {out} is not writable")
        return
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot create {flag} {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create {flag} {out}: {parent} is not writable")


def _host() -> str:
    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_owner(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(owner: dict) -> str:
    if not owner.get("pid"):
        return "another adala process (just starting)"
    since = owner.get("started")
    when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
    what = f" ({owner['what']})" if owner.get("what") else ""
    return f"pid {owner['pid']} on {owner.get('host', '?')}{what}{when}"


class OutLock:
    """The run lock of one output directory (see the module docstring); ``release`` is idempotent."""

    def __init__(self, out: Path, what: str) -> None:
        self.out, self.what = out, what
        self.path = out / LOCK
        self.fd: int | None = None
        self.took_over: dict | None = None

    def _in_use(self, owner: dict) -> ConfigError:
        return ConfigError(f"{self.out} is in use by {_describe(owner)}; wait for that run to finish or use "
                           f"another --out (if that run is gone, delete {self.path})")

    def acquire(self) -> OutLock:
        me = {"pid": os.getpid(), "host": _host(), "started": round(time.time(), 3), "what": self.what}
        # lazy: POSIX only
        import fcntl

        for _ in range(100):  # only loops when another process replaced or removed the file meanwhile
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    flocked = True
                except BlockingIOError:
                    raise self._in_use(_read_owner(self.path)) from None
                except OSError as e:
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
                    flocked = False
                try:
                    current = os.stat(self.path)
                except FileNotFoundError:
                    os.close(fd)
                    continue
                mine = os.fstat(fd)
                if (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
                    os.close(fd)
                    continue  # the previous owner released (unlinked) it between our open and flock
                owner = _read_owner(self.path)
                if owner.get("pid") and owner.get("host") != me["host"]:
                    raise self._in_use(owner)  # cannot tell from here whether that pid still runs
                if not flocked and owner.get("pid") and owner["pid"] != me["pid"] and _pid_alive(owner["pid"]):
                    raise self._in_use(owner)
                if owner.get("pid") and owner["pid"] != me["pid"]:
                    self.took_over = owner
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            if self.took_over:
                log.info("took over the stale lock of %s in %s", _describe(self.took_over), self.out)
            return self
        raise ConfigError(f"could not take the lock {self.path}: it keeps changing under another process")

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.unlink(self.path)  # while still holding it: a waiting process then sees a new file
        except OSError:
            pass
        os.close(fd)


def write_marker(out: Path, what: str) -> None:
    """Mark ``out`` as adala's (kept after the run: resumes and recipes recognise it)."""
    if not (out / MARKER).is_file():
        atomic_write_text(out / MARKER, json.dumps({"created_by": what, "adala_version": __version__,
                                                    "time": round(time.time(), 3)}) + "\n")


def _cleanup(out: Path, created_dir: bool, wrote_marker: bool) -> None:
    """After a run that failed before writing anything else, take back what claiming added."""
    try:
        left = {p.name for p in out.iterdir()}
    except OSError:
        return
    if left - {MARKER, LOCK}:
        return
    if wrote_marker:
        with contextlib.suppress(OSError):
            (out / MARKER).unlink()
    if created_dir:
        with contextlib.suppress(OSError):
            out.rmdir()


@contextlib.contextmanager
def _terminate_releases(lock: OutLock) -> Iterator[None]:
    """With the default SIGTERM action (API use), release the lock and then die by SIGTERM as before;
    a program with its own handler (the CLI's) is left alone: its exception unwinds through ``claim``."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        lock.release()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def claim(out: Path, what: str) -> Iterator[Path]:
    """Create ``out`` if needed, hold its lock and mark it adala's for the ``with`` body (rank 0 only).

    Call :func:`check_target` first. When the body fails before anything else was written, the directory
    is left as it was found (a directory this call created is removed again).
    """
    if launch_rank() != 0:
        yield out
        return
    created_dir = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out {out}: {e.strerror or e}") from None
    lock = OutLock(out, what)
    try:
        lock.acquire()
    except BaseException:
        if created_dir:
            _cleanup(out, created_dir, False)
        raise
    wrote_marker = not (out / MARKER).is_file()
    ok = False
    try:
        try:
            write_marker(out, what)
        except OSError as e:
            raise ConfigError(f"cannot write into --out {out}: {e}") from None
        with _terminate_releases(lock):
            yield out
        ok = True
    finally:
        lock.release()
        if not ok:
            _cleanup(out, created_dir, wrote_marker)


# ------------------------------------------------------------------------------------ stage outputs

def out_dir(out: str | os.PathLike | None, stage: str) -> Path:
    if out is None:
        return Path(tempfile.mkdtemp(prefix=f"adala-{stage}-"))
    return Path(out)


def check_out(out: Path, resume: bool) -> None:
    """Refuse to train over a finished stage or into a file; ``resume`` needs the engine's checkpoints."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    if resume and not (out / "checkpoints").is_dir():
        raise ConfigError(f"--resume: {out} has no checkpoints to resume from")


def is_finished(out: Path) -> bool:
    """A finished stage: ``finish`` writes the model, then ``metrics.json`` last."""
    return (out / "adala.json").is_file() and (out / METRICS).is_file()


@contextlib.contextmanager
def claim_output(out: Path, stage: str, *, resume: bool, force: bool,
                 inputs: Iterable[tuple[str, Any]] = ()) -> Iterator[Path]:
    """Check ``out`` (not an input, not a stranger's directory, creatable; see :mod:`adala.outdir`), then
    hold its run lock for the ``with`` body. Runs first in a stage, before any model or data is loaded, so a
    second run on the same directory fails at once and a refused directory is never touched."""
    if not isinstance(force, bool):
        raise ConfigError(f"force must be true or false, got {force!r}")
    check_target(out, inputs, force=force)
    check_out(out, resume)
    with claim(out, stage):
        yield out
