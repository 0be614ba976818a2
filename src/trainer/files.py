"""Files: atomic writes, leftovers of killed writes, checksums, and the project's own files
found from any folder. Standard library only (the pack tool uses it too)."""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path

from trainer.settings import InputError, RunError


def temporary_name(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.{pid}.tmp")


def write_atomic(path: str | Path, data: bytes, overwrite: bool = True) -> None:
    """Write to a temporary name and rename, so a crash never leaves a complete-looking file;
    a failed write leaves nothing behind. With overwrite=False an existing file is an error."""
    path = Path(path)
    temporary = temporary_name(path, os.getpid())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails if the path exists: never replaces a file
    except FileExistsError:
        raise
    except OSError as error:
        raise RunError(f"{path}: cannot write ({error.strerror}); nothing was written") from None
    finally:
        temporary.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files of earlier writes to `path` whose process is gone (a
    write killed mid-way, e.g. by SIGKILL during its fsync); returns what was removed."""
    path, removed = Path(path), []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = candidate.name[len(path.name) + 2 : -len(".tmp")]
        if pid.isdigit() and not process_alive(int(pid)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def regular_file(path: str | Path, what: str) -> Path:
    """`path` if it is a regular file (a device or a pipe could block a read forever)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such {what}")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file (a {what} is expected)")
    return path


def bundled_file(relative: str) -> Path:
    """A path as given (under the working directory), else one of the project's files
    found beside this program: the tokenizer and the smoke text work from any folder."""
    bases = (Path.cwd(), *Path(__file__).resolve().parents[:3])
    return next((base / relative for base in bases if (base / relative).exists()), Path(relative))
