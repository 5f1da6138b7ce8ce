"""Files that long jobs can be killed in the middle of writing (training, collection, caches).

- ``atomic_write(path)``: a context manager yielding a file object; the data goes to a uniquely
  named temp file in the same directory, is fsynced, and replaces ``path`` in one ``os.replace``.
  A crash (or an exception) leaves the old file (or none), never a partial one; two writers of
  one path never share a temp file. ``atomic_write_text``/``_json``/``atomic_torch_save`` wrap it.
- JSONL logs: ``append_jsonl`` writes one whole line per call and first cuts off a partial last
  line (a write cut short by a kill); ``read_jsonl`` drops such a line with a notice, and raises
  ``CorruptFile`` naming the file and line for damage elsewhere; ``trim_jsonl`` rewrites a log
  (atomically) to the records a resumed run keeps.
- ``load_checkpoint``: ``torch.load(weights_only=True)`` whose errors name the file and say how to
  start fresh.
- ``DirLock``: one job per output directory. The lock file holds the holder's PID, host, command
  and start time; the kernel's ``flock`` (released when the holder dies, even by kill -9) says
  whether it is held, so a stale lock is taken over with a notice and a live one is refused with
  a message naming its holder.

``UserError`` marks errors whose message is the whole story: the CLIs print them on one line.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

_UMASK = os.umask(0)
os.umask(_UMASK)


class UserError(Exception):
    """An error the user can fix from its message alone (CLIs: one line, exit code 1)."""


class CorruptFile(UserError, ValueError):
    """A file that exists but cannot be used (truncated, damaged, not what it should be)."""


class DirLocked(UserError, RuntimeError):
    """The output directory is in use by another live process."""


def notice(message: str) -> None:
    """A one-line note on stderr (a repair done, a setting kept, a stale lock taken over)."""
    print(f"fastattn: {message}", file=sys.stderr, flush=True)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temp file next to ``path`` for writing; on success fsync it and rename it over
    ``path``; on any exception (KeyboardInterrupt included) delete it and re-raise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result should look like open()'s
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_write_json(path, obj, **dumps_kw) -> None:
    atomic_write_text(path, json.dumps(obj, **dumps_kw) + "\n")


def atomic_torch_save(obj, path) -> None:
    import torch

    with atomic_write(path) as f:
        torch.save(obj, f)


def remove_stale_temps(directory) -> None:
    """Delete temp files that ``atomic_write`` left behind when its process was killed."""
    for p in Path(directory).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# ---------------------------------------------------------------------------------------------
# JSONL logs
def _cut_partial_line(f) -> Optional[int]:
    """If the file (opened r+b/a+b) does not end in a newline, truncate it after its last newline
    and return the number of bytes cut."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return None
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return None
    block, pos = 1 << 16, size
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        chunk = f.read(pos - start)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            keep = start + nl + 1
            break
        pos = start
    else:
        keep = 0
    f.truncate(keep)
    return size - keep


def append_jsonl(path, record: dict) -> None:
    """Append ``record`` as one line (one ``write`` call). A partial last line left by a killed
    writer is cut off first (with a notice), so it never glues onto this record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record) + "\n").encode()
    with open(path, "a+b") as f:
        cut = _cut_partial_line(f)
        if cut:
            notice(f"{path}: dropped a partial last line ({cut} bytes, a write cut short)")
        f.seek(0, os.SEEK_END)
        f.write(line)


def read_jsonl(path, *, repair: bool = False) -> List[dict]:
    """The records of a JSONL log ([] when it does not exist). A last line without its newline
    (a write cut short) is dropped with a notice — and cut from the file when ``repair``; an
    unparsable line elsewhere raises ``CorruptFile`` naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    records = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except ValueError as e:
            raise CorruptFile(f"{path}, line {n}: not JSON ({e}); fix or delete the line "
                              "(or start fresh)") from None
    if tail.strip():
        notice(f"{path}: dropped a partial last line ({len(tail)} bytes, a write cut short)")
        if repair:
            with open(path, "r+b") as f:
                _cut_partial_line(f)
    return records


def write_jsonl(path, records: Iterable[dict]) -> None:
    """Replace a JSONL log atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def trim_jsonl(path, keep: Callable[[dict], bool]) -> List[dict]:
    """Keep only the records ``keep`` accepts (a resumed run drops what it will write again);
    rewrites the file only when something goes. Returns the kept records."""
    path = Path(path)
    if not path.exists():
        return []
    records = read_jsonl(path)
    kept = [r for r in records if keep(r)]
    if len(kept) != len(records) or path.read_bytes()[-1:] not in (b"", b"\n"):
        write_jsonl(path, kept)
    return kept


# ---------------------------------------------------------------------------------------------
# checkpoints
def load_checkpoint(path, *, required: Sequence[str] = (), map_location="cpu",
                    fresh: str = "--fresh") -> dict:
    """``torch.load(path, weights_only=True)`` as a dict holding the ``required`` keys.

    A file that cannot be read or lacks a key raises ``CorruptFile`` naming it and saying how to
    start over (``fresh``: the option that does; "" for files that are inputs, not resume points).
    """
    import torch

    path = Path(path)
    how = f"; delete it or start fresh ({fresh})" if fresh else ""
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated zip, garbage, pickled code refused by weights_only, …
        msg = str(e).strip().splitlines()[0].split(". ")[0][:160] if str(e).strip() else ""
        raise CorruptFile(f"{path}: unreadable checkpoint ({type(e).__name__}: {msg}){how}") from None
    missing = [k for k in required if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise CorruptFile(f"{path}: not a checkpoint of this kind (missing {missing}){how}")
    return ck


# ---------------------------------------------------------------------------------------------
# output-directory lock
LOCK_NAME = "fastattn.lock"


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (f"PID {holder.get('pid')} on {holder.get('host')} (since {when}): "
            f"{holder.get('command', '?')}")


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {"command": raw[:200].decode(errors="replace")}


class DirLock:
    """Exclusive use of a directory by one process (``with DirLock(out_dir): ...``).

    A second process gets ``DirLocked`` naming the holder; a lock file whose process has died is
    taken over with a notice. Not reentrant: a second lock on the same directory in the same
    process is refused too.
    """

    def __init__(self, directory, command: Optional[str] = None):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        argv = getattr(sys, "orig_argv", sys.argv)  # python -m fastattn ...: the module, not __main__.py
        self.command = command or " ".join([Path(argv[0]).name, *argv[1:]]) or "python"
        self.fd: Optional[int] = None

    def acquire(self) -> "DirLock":
        import fcntl

        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise DirLocked(f"{self.directory} is in use by {_describe(holder)}; wait for it "
                                f"to finish, stop it, or use another output directory") from None
            try:  # a holder that was releasing may have unlinked the file we locked: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = _read_holder(fd)
            if old:
                notice(f"taking over the stale lock {self.path} of {_describe(old)} "
                       "(that process is gone)")
            me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": time.time()}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(me) + "\n").encode())
            os.fsync(fd)
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
