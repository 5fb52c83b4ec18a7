"""Output that never destroys: a directory or file appears complete or not at all, is
fsynced before it is renamed into place, and `--force` replaces only a directory npllama
wrote. Every refusal happens before any work is done and leaves nothing behind."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterator

from ..errors import UsageError


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(dirpath, name))
        _fsync(dirpath)


def check_parent(path: str, what: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{path}: cannot write the {what} there: {parent} is not an existing directory")


def check_directory(dst: str, force: bool, owned: Callable[[str], bool], what: str) -> None:
    """Whether `dst` may be written: it does not exist (and its parent does), or --force was
    given and it is a directory npllama wrote (`owned`), or an empty one."""
    if not os.path.lexists(dst):
        check_parent(dst, what)
        return
    if not force:
        raise UsageError(f"{dst}: already exists (use --force to replace it)")
    if os.path.islink(dst) or not os.path.isdir(dst):
        raise UsageError(f"{dst}: not a directory; --force replaces only a {what} npllama wrote, so nothing "
                         "was touched")
    if os.listdir(dst) and not owned(dst):
        raise UsageError(f"{dst}: not a {what} npllama wrote; --force replaces only those, so nothing was "
                         "touched (choose another name, or remove it yourself)")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


MAX_SOURCE_ENTRIES = 100_000   # a model folder holds tens of files; a walk past this is refused, not cut short


def _folder_entries(root: str) -> Iterator[str]:
    """Every file, link and folder under root, not following links (a bounded walk)."""
    stack, seen = [root], 0
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:   # unreadable: nothing in it is read by the command either
            continue
        with it:
            for e in it:
                seen += 1
                if seen > MAX_SOURCE_ENTRIES:
                    raise UsageError(f"{root}: holds more than {MAX_SOURCE_ENTRIES:,} files; not a model folder "
                                     "whose outputs can be checked against it, nothing was touched")
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                yield e.path


def _source_paths(src: str) -> tuple[set[str], set[str]]:
    """(folders, files) a source is made of, resolved: a file is itself; a folder is itself
    plus where each file or link it holds leads (an HF hub cache's snapshots/abc/model.safetensors
    -> ../../blobs/h3: blobs/h3, so that blobs/ contains a source). A new file beside a linked
    target destroys nothing, so the target's folder is not a source itself."""
    real = os.path.realpath(src)
    if not os.path.isdir(src):
        return set(), {real}
    folders, files = {real}, set()
    for path in _folder_entries(src):
        target = os.path.realpath(path)
        (folders if os.path.isdir(target) else files).add(target)
    return folders, files


def _identities(paths) -> set[tuple[int, int]]:
    """(device, inode) of each path that exists: a hard link elsewhere is the same file."""
    out = set()
    for p in paths:
        with contextlib.suppress(OSError, ValueError):
            st = os.stat(p)
            out.add((st.st_dev, st.st_ino))
    return out


def refuse_overlap(dst: str, sources, what: str) -> None:
    """An output may not be, contain or lie inside any of its sources, after every symbolic
    link is resolved (and a hard link or bind mount recognised): replacing it would destroy
    what it is made from, whatever --force says and whatever an index.json there claims. A
    folder's sources include what each file in it links to (_source_paths). `sources` are
    paths (None entries are skipped); refused before any work is done."""
    out = os.path.realpath(dst)
    mine = _identities([dst])
    for src in sources:
        if src is None:
            continue
        folders, files = _source_paths(src)
        hit = next((p for p in sorted(folders) if _within(out, p) or _within(p, out)), None)
        hit = hit or next((p for p in sorted(files) if _within(p, out)), None)
        if hit is None and mine and mine & _identities(folders | files):
            hit = os.path.realpath(src)
        if hit is not None:
            raise UsageError(f"{dst}: the {what} would be, contain or lie inside its source {src} (resolved: {out} "
                             f"and {hit}); write it somewhere else, nothing was touched")


def check_file(path: str, what: str) -> None:
    """Whether a single output file may be written (replaced if it is a file)."""
    check_parent(path, what)
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory; give a file name for the {what}")


@contextlib.contextmanager
def staged_directory(dst: str, force: bool, owned: Callable[[str], bool], what: str,
                     verify: Callable[[], None] | None = None) -> Iterator[str]:
    """Yields a fresh directory beside dst to fill; on success it is fsynced and renamed to
    dst (replacing the old one only as check_directory allows); on failure it is removed.
    verify, if given, runs after the filling and before the rename: what it raises discards
    the directory (a source that changed while it was read)."""
    dst = os.path.abspath(dst)
    check_directory(dst, force, owned, what)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=os.path.dirname(dst))
    try:
        yield tmp
        if verify is not None:
            verify()
        fsync_tree(tmp)
        if os.path.lexists(dst):
            check_directory(dst, force, owned, what)  # again: it may have changed meanwhile
            old = tmp + ".old"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dst)
        _fsync(os.path.dirname(dst))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(path: str, what: str) -> Iterator[str]:
    """Yields a fresh temporary file beside path to fill (a name of its own: never a file
    someone else has); on success it is fsynced and renamed to path, on failure removed."""
    check_file(path, what)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.partial-", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)   # mkstemp makes it 0600; the file should have what open() gives
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_file(path: str, write: Callable[[str], None], what: str) -> None:
    """write(tmp) fills a temporary file that becomes path (staged_file)."""
    with staged_file(path, what) as tmp:
        write(tmp)
