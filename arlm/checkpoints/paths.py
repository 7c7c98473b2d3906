"""Which files a checkpoint may make arlm open: regular files, inside the checkpoint.

Two rules, checked BEFORE a file is opened:

* **Regular files only.** A FIFO blocks `open()` forever, `/dev/zero` or `/dev/urandom`
  never end, a socket or a directory is not a file at all. `os.stat` tells them apart
  without opening anything; `open_regular` then opens with `O_NONBLOCK` and re-checks the
  opened descriptor, so a file swapped for a FIFO between the check and the open cannot
  block either.
* **Reads stay inside the checkpoint.** A file named by an index or config
  (`model.safetensors.index.json`'s `weight_map`, …) must resolve, symlinks included,
  inside the checkpoint's root. Absolute names and `..` components are refused outright;
  a symlink whose target lies outside is refused after `os.path.realpath`. The check runs
  before anything is stat-ed, so the error is the same whether the outside target exists
  or not: a checkpoint cannot be used to probe the rest of the file system.

The root is the realpath of the directory the user passed, with one exception: a
Hugging Face hub cache snapshot (`…/models--ORG--NAME/snapshots/REV/`) holds symlinks to
`../../blobs/<hash>`, so for a directory of that shape the root is the repository folder
`…/models--ORG--NAME`. Pass the snapshot directory itself; its blobs are then allowed,
anything outside `models--ORG--NAME` is not.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from arlm.checkpoints.layout import CheckpointFormatError

_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def file_kind(mode: int) -> str:
    """A readable name for what an `st_mode` describes ("regular file", "FIFO (named pipe)", …)."""
    if stat.S_ISREG(mode):
        return "regular file"
    for test, name in _KINDS:
        if test(mode):
            return name
    return "special file"


def require_regular_file(path: str, *, what: str) -> os.stat_result:
    """`os.stat(path)` (symlinks followed) if it is a regular file; never opens it.

    Raises FileNotFoundError when nothing is there, CheckpointFormatError for a FIFO,
    device, socket, directory or an unreadable entry (a symlink loop, a permission error).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such {what}: {path}") from None
    except OSError as err:
        raise CheckpointFormatError(f"cannot stat {what} {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointFormatError(
            f"{what} {path} is a {file_kind(st.st_mode)}, not a regular file; arlm does not open it")
    return st


def open_regular(path: str, *, what: str) -> BinaryIO:
    """Open a regular file for binary reading without ever blocking on a FIFO or device.

    The path is stat-ed first (`require_regular_file`); the open itself uses `O_NONBLOCK`
    (which does nothing to a regular file) and the descriptor is checked again with `fstat`.
    """
    require_regular_file(path, what=what)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointFormatError(
                f"{what} {path} is a {file_kind(mode)}, not a regular file; arlm does not open it")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def checkpoint_root(directory: str) -> str:
    """The folder that files of the checkpoint `directory` must resolve into (see the module docstring).

    The realpath of `directory`, or, for a Hugging Face hub cache snapshot
    `…/models--ORG--NAME/snapshots/REV`, the realpath of `…/models--ORG--NAME`.
    """
    real = os.path.realpath(directory)
    snapshots = os.path.dirname(real)
    repo = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith("models--"):
        return repo
    return real


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def contained_path(directory: str, name: str, *, source: str, root: str | None = None) -> str:
    """`directory/name` if `name` is a plain relative name that resolves inside the checkpoint root.

    Nothing is stat-ed or opened: the error for a name that leaves the checkpoint
    (absolute, `..`, a symlink out) is the same whether its target exists or not.

    Args:
      directory: the checkpoint directory.
      name: a file name as written in an index or config (may contain `/` sub-folders).
      source: what named the file, for the error ("model.safetensors.index.json weight_map").
      root: the allowed root; `checkpoint_root(directory)` when None.
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointFormatError(f"{source} names {name!r}, which is not a file name")
    root = checkpoint_root(directory) if root is None else root
    refused = f"{source} names {name!r}, which lies outside the checkpoint directory {directory}"
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        raise CheckpointFormatError(f"{refused} (absolute path); arlm reads only files inside the checkpoint")
    if ".." in name.replace("\\", "/").split("/"):
        raise CheckpointFormatError(f"{refused} ('..' component); arlm reads only files inside the checkpoint")
    path = os.path.join(directory, name)
    if not _inside(root, os.path.realpath(path)):
        raise CheckpointFormatError(f"{refused} (through a symlink); arlm reads only files inside the checkpoint")
    return path


def checked_file(directory: str, name: str, *, what: str, source: str | None = None,
                 root: str | None = None) -> str:
    """Path of the checkpoint file `name`: inside the checkpoint root and a regular file, else an error.

    Containment is checked first (identical error whether an outside target exists or
    not), then the file type, without opening anything.

    Args:
      directory: the checkpoint directory.
      name: the file's name relative to `directory` (as an index or config lists it).
      what: what the file is, for messages ("config.json", "safetensors shard").
      source: what named the file; defaults to "the checkpoint".
      root: the allowed root; `checkpoint_root(directory)` when None.

    Raises:
      CheckpointFormatError: outside the root, or not a regular file (FIFO, device, socket,
        directory), or not stat-able.
      FileNotFoundError: inside the root but missing (a dangling symlink included).
    """
    path = contained_path(directory, name, source=source or f"the checkpoint {directory}", root=root)
    require_regular_file(path, what=what)
    return path


__all__ = ["checked_file", "checkpoint_root", "contained_path", "file_kind", "open_regular",
           "require_regular_file"]
