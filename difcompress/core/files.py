"""Every write difcompress makes, and the reads of others' files: atomic, locked, shared.

Guarantees, each enforced here once:
* atomic: a folder is built under a temporary sibling name and renamed when complete, so a
  crash never leaves something that looks finished; a file is written beside its target
  and renamed over it;
* locked: one process at a time writes an output (an OS lock held for the run's life and
  released by the kernel even on kill -9);
* shared: files and folders get the permissions the process umask allows (temporary
  folders are private by default, outputs are not);
* a full disk, a read-only folder or a missing permission is one clear error naming the
  folder, never a traceback, and temporaries are removed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from difcompress.core.console import human, warn
from difcompress.core.errors import UserError

WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_permissions(root: Path) -> None:
    """Give `root` and everything below it the modes a normal write would have had."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_error(folder: Path, err: BaseException, needed_bytes: int | None = None) -> UserError | None:
    """The user-facing error for a failed write, or None when `err` is not about the disk."""
    if isinstance(err, SafetensorError):
        reason = str(err).split(": ", 1)[-1]
    elif isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
        reason = err.strerror or str(err)
    else:
        return None
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    need = f"about {human(needed_bytes, 'B')} needed, " if needed_bytes else ""
    return UserError(f"cannot write {folder}: {reason} ({need}{human(free, 'B')} free there); "
                     "free some space or choose another location")


@contextmanager
def disk_errors(folder: Path, needed_bytes: int | None = None) -> Iterator[None]:
    """Turn a full disk or a refused write inside the block into one clear UserError."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        converted = write_error(Path(folder), err, needed_bytes)
        if converted is None:
            raise
        raise converted from None


@contextmanager
def atomic_folder(out: str | Path, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out` in one rename.

    On any failure the temporary folder is removed; disk errors become one UserError.
    """
    out = Path(out)
    with disk_errors(out, needed_bytes):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            yield tmp
            share_permissions(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            remove(old)
        else:
            tmp.rename(out)


def write_text(path: Path, text: str) -> None:
    """Write a file atomically: beside it under a temporary name, then renamed over it."""
    _write_atomically(path, lambda tmp: tmp.write_text(text))


def read_text(path: str | Path) -> str:
    """A text file someone else wrote (recipe, prompts, captions, JSON) as UTF-8; one error
    line when it cannot be read or is not text."""
    try:
        raw = Path(path).read_bytes()
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path} is not UTF-8 text (line {line}, byte {err.start}); pass a text file") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None


def read_json(path: str | Path) -> Any:
    """A JSON file read back (a manifest, a config, an evaluation); one error line when damaged."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}); the folder is damaged") from None


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file, written atomically (as write_text)."""
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_atomically(path, lambda tmp: save_file({k: t.contiguous() for k, t in tensors.items()}, tmp), needed)


def _write_atomically(path: Path, write: Callable[[Path], Any], needed_bytes: int | None = None) -> None:
    path = Path(path)
    with disk_errors(path.parent, needed_bytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            write(tmp)
            tmp.chmod(0o666 & ~_umask())
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def remove_temporaries(folder: Path) -> None:
    """Delete what interrupted writes of `folder` left beside it (`.NAME.tmp-*`, `.NAME.old-*`).
    Call only while holding `folder`'s lock: then no live process owns them."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return
    for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.old-*"):
        for debris in folder.parent.glob(pattern):
            remove(debris)


def remove(path: Path) -> None:
    """Delete a file, link or folder tree, whichever `path` is (gone already is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _lock(lock_path: Path, wait: bool) -> int:
    """An open descriptor holding the exclusive lock on `lock_path`. The holder unlinks the
    file when done, so after locking check that the path still names the locked file."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{lock_path.parent / lock_path.name[1:-5]} is in use by another difcompress run "
                            f"({holder}); wait for it to finish or choose another output") from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed it meanwhile: lock the new one


@contextmanager
def folder_lock(folder: str | Path, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive OS lock on `folder` (the file `.NAME.lock` beside it) for the
    block's life. A second process asking for it gets one error naming the holder (or,
    with `wait`, blocks until it is free); the kernel releases it when the holder exits,
    however it exits, and a clean exit removes the file."""
    folder = Path(folder)
    lock_path = folder.parent / f".{folder.name}.lock"
    refuse_a_file_in_the_way(folder)
    with disk_errors(folder.parent):
        folder.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock(lock_path, wait)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def wait_for(condition: Callable[[], bool], poll_seconds: float = 2.0) -> None:
    """Block until `condition()` holds. Other processes of a launch wait for the main one this
    way (a collective barrier would time out during a long prune, encode or eval); if the main
    process fails, the launcher stops them."""
    while not condition():
        time.sleep(poll_seconds)


CACHE_INDEX = "index.json"


def cache_damage(folder: Path) -> str | None:
    """Why a published cache folder cannot be trusted, or None: its index records every
    file's size, and a file cut short (a crash or a full disk mid-write, a copy) or gone
    no longer matches."""
    try:
        files = json.loads((folder / CACHE_INDEX).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return "its index.json is unreadable"
    if not isinstance(files, dict):
        return "its index.json records no file sizes (an older cache)"
    for name, size in files.items():
        path = folder / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            return f"{name} is {'missing' if actual is None else f'{actual} of {size} bytes'}"
    return None


def _record_sizes(folder: Path) -> None:
    """Add each file's size to the index `write` left, for cache_damage to check."""
    index = read_json(folder / CACHE_INDEX)
    index["files"] = {p.relative_to(folder).as_posix(): p.stat().st_size
                      for p in sorted(folder.rglob("*")) if p.is_file() and p.name != CACHE_INDEX}
    write_json(folder / CACHE_INDEX, index)


def build_once(folder: Path, write: Callable[[Path], None], *, build_here: bool = True) -> tuple[Any, bool]:
    """A cache folder built by one process and afterwards only read. The builder holds the
    folder's lock (a second run wanting the same cache waits for it) and publishes it
    atomically; `write` fills it and writes its index.json, to which the sizes of its files
    are added. A damaged cache (cache_damage) is rebuilt, with one warning. A process told
    not to build (the others of a launch) waits for a sound folder instead. Returns the
    index, and whether the folder was already there."""
    index_path = folder / CACHE_INDEX
    reused = index_path.is_file() and cache_damage(folder) is None
    if not reused and build_here:
        with folder_lock(folder, wait=True):
            damage = cache_damage(folder) if index_path.is_file() else "missing"
            if damage:  # nobody finished or repaired it while we waited
                if damage != "missing":
                    warn(f"the cache {folder} is damaged ({damage}); rebuilding it")
                remove_temporaries(folder)
                with atomic_folder(folder) as tmp:
                    write(tmp)
                    _record_sizes(tmp)
    elif not reused:
        wait_for(lambda: index_path.is_file() and cache_damage(folder) is None)
    return read_json(index_path), reused


def resolved_source(source: str | Path) -> str:
    """Where a source lives, for the record: an existing path made absolute, anything else
    (a hub id, a dataset name, a built-in name) as given."""
    return str(Path(source).resolve()) if Path(source).exists() else str(source)


# Why a file system refuses a hard link where a copy would do: another device, no hard
# links at all (FAT, some network mounts), or too many links to one file.
_NO_HARD_LINK = {errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


def link_or_copy(source: Path, target: Path) -> None:
    """`target` as a second name of `source` (a hard link: one copy on disk), or a copy of
    it where the file system cannot link the two."""
    try:
        os.link(source, target)
    except OSError as err:
        if err.errno not in _NO_HARD_LINK:
            raise
        shutil.copyfile(source, target)


def folder_size_bytes(folder: str | Path, pattern: str = "*") -> int:
    """Bytes on disk under `folder` (of the files named like `pattern`), a hard-linked file
    counted once."""
    seen, total = set(), 0
    for path in Path(folder).rglob(pattern):
        if path.is_file():
            st = path.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def file_in_the_way(out: str | Path) -> Path | None:
    """The file, if any, standing where one of `out`'s parent folders would have to be."""
    nearest = next((p for p in Path(out).expanduser().absolute().parents if p.exists()), None)
    return nearest if nearest is not None and not nearest.is_dir() else None


def refuse_a_file_in_the_way(out: Path) -> None:
    blocking = file_in_the_way(out)
    if blocking is not None:
        raise UserError(f"cannot write {out}: {blocking} is a file, not a folder; choose another output")
