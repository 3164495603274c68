"""One run at a time in an ``output_dir``: a lock file naming the process that holds it.

A run takes the lock (:func:`acquire_lock`) when it starts writing and removes it when it ends
(:func:`release_lock`); a second run into the same folder is refused with a line naming the holder.
The lock is written whole under a temporary name and hard-linked into place, so it exists only with
its content and only one process can create it. A run killed with SIGKILL leaves its lock behind:
it is *stale* when it names this host and a process that no longer exists, and is then replaced with
a warning. A lock from another host cannot be checked; the message says how to remove it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import time
from typing import Any

logger = logging.getLogger(__name__)

#: The lock file in ``output_dir`` (hidden, never a run artifact, never uploaded: it is gone when the run ends).
LOCK_FILE = ".etu-hf.lock"


def _host() -> str:
    return socket.gethostname()


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (``kill(pid, 0)``: no signal is sent)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def lock_holder(output_dir: str) -> dict[str, Any] | None:
    """What the live lock of ``output_dir`` says (``pid``, ``host``, ``started``, ``command``), or ``None``
    when the folder is not locked or its lock is stale (this host, the process gone)."""
    path = os.path.join(output_dir, LOCK_FILE)
    if not os.path.lexists(path):
        return None
    info = _read(path)
    if info is None:  # unreadable: written by something else, or half a file from an older version
        return {"pid": "?", "host": "?", "started": "?", "command": "?", "path": path}
    pid = info.get("pid")
    if info.get("host") == _host() and isinstance(pid, int) and not _alive(pid):
        return None
    return {**info, "path": path}


def _busy_message(output_dir: str, holder: dict[str, Any], flag: str) -> str:
    return (
        f"{flag} {output_dir!r} is in use by another etu-hf run (pid {holder.get('pid')} on host "
        f"{holder.get('host')}, started {holder.get('started')}: {holder.get('command')}); nothing was written. "
        f"Wait for it to finish or choose another {flag}; if no such run is going on, delete {holder['path']}."
    )


def check_not_locked(output_dir: str, flag: str = "--output_dir") -> None:
    """``ValueError`` naming ``flag`` and the holder when another live run holds ``output_dir``'s lock."""
    holder = lock_holder(output_dir)
    if holder is not None:
        raise ValueError(_busy_message(output_dir, holder, flag))


def acquire_lock(output_dir: str, flag: str = "--output_dir") -> str:
    """Take ``output_dir``'s lock (the folder must exist) and return its path.

    A stale lock (see the module) is replaced with a warning; a live one raises ``ValueError``
    (:func:`check_not_locked`'s message).
    """
    path = os.path.join(output_dir, LOCK_FILE)
    info = {
        "pid": os.getpid(),
        "host": _host(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
    }
    fd, tmp = tempfile.mkstemp(dir=output_dir, prefix=".etu-hf-lock-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f)
        for _ in range(2):
            try:
                os.link(tmp, path)  # fails when the lock exists: only one process gets it
                return path
            except FileExistsError:
                holder = lock_holder(output_dir)
                if holder is not None:
                    raise ValueError(_busy_message(output_dir, holder, flag)) from None
                stale = _read(path) or {}
                logger.warning(
                    "%s: removing a stale lock left by a run that was killed (pid %s, started %s)",
                    output_dir,
                    stale.get("pid"),
                    stale.get("started"),
                )
                os.unlink(path)
            except OSError:  # a file system without hard links: exclusive create instead
                with open(path, "x", encoding="utf-8") as f:
                    json.dump(info, f)
                return path
        raise ValueError(f"{flag} {output_dir!r}: another run took the lock at the same moment; nothing was written.")
    finally:
        os.unlink(tmp)


def release_lock(output_dir: str) -> None:
    """Remove ``output_dir``'s lock when this process holds it."""
    path = os.path.join(output_dir, LOCK_FILE)
    info = _read(path)
    if info is not None and info.get("pid") == os.getpid() and info.get("host") == _host():
        os.unlink(path)
