"""Output paths: what a command may replace, how it replaces it, and what an interrupted write leaves behind.

Every output is built under a hidden name beside its destination and swapped into place when complete, so a kill
at any moment leaves either the old output or the new one, never a half-written one that loads:

    .NAME.partial-PID   being written (incomplete: removed by the next run)
    .NAME.ready-PID     complete, about to replace NAME
    .NAME.old-PID       the previous NAME, removed once the new one is in place

`recover` (run before every write into a folder) finishes or undoes what a dead process left: if NAME is missing
it puts the newest complete version back, then removes the leftovers of processes that no longer run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable, Iterable
from pathlib import Path


class OutputError(ValueError):
    """An output path that must not be written, with the reason in one line."""


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|ready|old)-(?P<pid>\d+)$")


def _hidden(dst: Path, kind: str, pid: int | None = None) -> Path:
    return dst.parent / f".{dst.name}.{kind}-{os.getpid() if pid is None else pid}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def recover(folder: Path) -> list[str]:
    """Finish or undo the swaps that dead processes left in `folder` and remove their leftovers; returns what was
    done, one line each. Leftovers of processes still running are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found: dict[str, list[tuple[str, int, Path]]] = {}
    for p in folder.iterdir():
        m = _LEFTOVER.match(p.name)
        if m and not _alive(int(m["pid"])):
            found.setdefault(m["name"], []).append((m["kind"], int(m["pid"]), p))
    done = []
    for name, items in found.items():
        dst = folder / name
        if not os.path.lexists(dst):  # killed between the two renames of a swap: put a complete version back
            for kind in ("ready", "old"):
                candidates = sorted((p for k, _, p in items if k == kind), key=lambda p: p.stat().st_mtime)
                if candidates:
                    os.replace(candidates[-1], dst)
                    done.append(f"restored {dst} from an interrupted write")
                    break
        for _, _, p in items:
            if os.path.lexists(p):
                _remove(p)
                done.append(f"removed {p.name}, left by an interrupted run")
    return done


def staging_dir(dst: Path) -> Path:
    """A fresh hidden folder beside `dst` to build its replacement in (after recovering the folder's leftovers)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    recover(dst.parent)
    tmp = _hidden(dst, "partial")
    _remove(tmp)
    tmp.mkdir()
    return tmp


def staging_file(dst: Path) -> Path:
    """A hidden path beside the file `dst` to write its replacement to."""
    dst = Path(dst)
    recover(dst.parent)
    tmp = _hidden(dst, "partial")
    _remove(tmp)
    return tmp


def _exchange_fn() -> Callable[[str, str], bool] | None:
    """An atomic swap of two paths where the OS has one (Linux renameat2, macOS renamex_np), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        if sys.platform == "darwin":
            fn = libc.renamex_np
            return lambda a, b: fn(a.encode(), b.encode(), ctypes.c_uint(0x2)) == 0  # RENAME_SWAP
        fn = libc.renameat2
        return lambda a, b: fn(-100, a.encode(), -100, b.encode(), ctypes.c_uint(0x2)) == 0  # RENAME_EXCHANGE
    except (AttributeError, OSError):
        return None


_EXCHANGE = _exchange_fn()


def replace_path(tmp: Path, dst: Path) -> None:
    """Move the finished `tmp` (folder or file) into place at `dst`. A kill at any point leaves `dst` whole: the old
    version or the new one (the OS's atomic exchange where it has one; else two renames that `recover` completes)."""
    tmp, dst = Path(tmp), Path(dst)
    ready = _hidden(dst, "ready")
    os.replace(tmp, ready)
    if not os.path.lexists(dst):
        os.replace(ready, dst)
        return
    if _EXCHANGE is not None and _EXCHANGE(str(ready), str(dst)):
        _remove(ready)  # now the old version
        return
    old = _hidden(dst, "old")
    os.replace(dst, old)
    os.replace(ready, dst)
    _remove(old)


def replace_dir(tmp: Path, dst: Path) -> None:
    """`replace_path` for a finished folder."""
    replace_path(tmp, dst)


def _inside(p: Path, folder: Path) -> bool:
    return p == folder or folder in p.parents


def check_output(
    dst: Path,
    *,
    force: bool,
    ours: Callable[[Path], bool],
    protect: Iterable[Path] = (),
    what: str = "output",
    folder: bool = True,
    not_ours: str = "",
) -> None:
    """Refuse to write `dst` where that would destroy what the user did not ask to replace.

    Always refused: a destination that is, or contains, a protected path (the model being converted or trained,
    the training data), anything that is not a plain file or folder (a device, a pipe, a socket), and a folder
    where a file goes. Refused without `force`: an existing destination that `ours` does not recognise as this
    tool's own output (`not_ours` says what it lacks, e.g. " and holds no checkpoint"). An empty folder is always
    fine for a folder output."""
    dst = Path(dst).expanduser()
    real = Path(os.path.realpath(dst))
    for p in protect:
        p = Path(os.path.realpath(p))
        if _inside(p, real):
            raise OutputError(f"{what} {dst} holds {p}, which this command reads; choose another path")
    if not os.path.lexists(dst):
        return
    mode = os.lstat(dst).st_mode
    if stat.S_ISLNK(mode):
        mode = os.stat(dst).st_mode if dst.exists() else stat.S_IFREG
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise OutputError(f"{what} {dst} is not a regular file or folder; choose another path")
    if not folder and stat.S_ISDIR(mode):
        raise OutputError(f"{what} {dst} is a folder; give a file name")
    if folder and stat.S_ISDIR(mode) and not any(dst.iterdir()):
        return
    if force or ours(dst):
        return
    raise OutputError(f"{dst} exists{not_ours}; pass --force to replace it")


# ---- metadata files copied from a model folder ----------------------------------------------------------------

METADATA_SUFFIXES = (".json", ".jinja", ".model", ".txt")
NOT_METADATA = {"config.json", "model.safetensors.index.json", "README.md", "trainer_state.json"}


def allowed_roots(folder: Path) -> list[Path]:
    """Where a model folder's symlinks may point: inside the folder, or (for a Hugging Face cache snapshot, whose
    files are links to blobs) inside the cached repo."""
    folder = Path(os.path.realpath(folder))
    roots = [folder]
    if folder.parent.name == "snapshots":
        roots.append(folder.parent.parent)
    return roots


def contained(path: Path, folder: Path) -> bool:
    """Whether `path` (followed through any symlinks) lies within `folder` (or its Hugging Face cache repo)."""
    real = Path(os.path.realpath(path))
    return any(_inside(real, r) for r in allowed_roots(folder))


def copy_metadata(src: Path, dst: Path, log: Callable[[str], None] | None = None) -> None:
    """Tokenizer, chat template, generation config and the like (not config.json, weights or indexes). A symlink
    is copied only when it points inside the model folder (or its Hugging Face cache repo): a link to anywhere
    else (`notes.txt -> ~/.ssh/id_rsa`) is skipped, with a line saying so."""
    for f in sorted(Path(src).iterdir()):
        if f.suffix not in METADATA_SUFFIXES or f.name in NOT_METADATA or not f.is_file():
            continue
        if f.is_symlink() and not contained(f, src):
            if log is not None:
                log(f"skipped {f.name}: a link to {os.path.realpath(f)}, outside the model folder")
            continue
        shutil.copyfile(f, dst / f.name)
