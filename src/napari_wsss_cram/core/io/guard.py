"""The one output guard of every command and dock that writes.

The rules (README, "What can go wrong"): an output never lands on, inside or over an input (``--out`` = the
input folder, or a folder above it, must not turn H&E images into masks nor delete them); nothing is deleted that
the command did not create (``--overwrite`` replaces the command's own outputs, by name); nothing is copied onto an
existing path (a hard link to an input would carry the copy into the input); a lock per folder; files renamed
into place whole (:mod:`.atomic`); and recovery after ``kill -9`` that reads its markers exactly.

Commands that write a *set* of files into a folder (``patchify``, ``pseudo-labels``) use :class:`OutputSet`: the
set is built in a hidden folder inside ``--out``, then moved into place file by file, and a manifest
(:data:`MANIFEST_NAME`, one relative path per line) records what the command wrote, so that the next
``--overwrite`` removes exactly those files and nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError, WsssCramError

MANIFEST_NAME = ".wsss-cram-outputs.txt"
LOCK_NAME = ".wsss-cram.lock"
BUILD_PREFIX = ".wsss-cram-build-"
#: hidden names of the package's own bookkeeping inside an output folder (never "foreign" files)
OWN_HIDDEN = (MANIFEST_NAME, LOCK_NAME, BUILD_PREFIX, ".wsss-cram-write-test.")


def ensure_can_write(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise ``OutputExistsError`` when ``path`` exists and ``overwrite`` is False; return it as a Path."""
    p = Path(path)
    if p.is_dir():  # first: --overwrite would not help
        raise OutputExistsError(f"Output '{p}' is a folder; choose a file name.")
    if p.exists() and not overwrite:
        raise OutputExistsError(f"Output '{p}' already exists; delete it, choose another output folder, "
                                "or pass --overwrite.")
    return p


def ensure_writable_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove it takes a file; raise ``WsssCramError`` naming it otherwise (a
    read-only place, an existing file in the way, a full disk) before any long work starts."""
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise WsssCramError(f"The {what} '{p}' is an existing file, not a folder; choose a folder.")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".wsss-cram-write-test.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err)).lower()
        raise WsssCramError(f"Cannot write into the {what} '{p}': {reason}. Choose a folder you can write to.") \
            from None
    return p


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "wsss-cram run") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` for a run that writes into it; raise ``WsssCramError`` at once when
    another run holds it (two runs into one folder would each keep only their own rows of a shared summary).

    An OS file lock (``flock`` / ``msvcrt``): it is released when the process ends, even by ``kill -9``, so a
    crashed run never leaves the folder locked.
    """
    folder = ensure_writable_folder(folder)
    path = folder / LOCK_NAME
    fh = None
    try:
        for _ in range(5):  # a run that just ended may remove the file we opened: then lock the new one
            fh = open(path, "a+")
            try:
                if os.name == "nt":  # pragma: no cover - Windows
                    import msvcrt

                    msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
                else:
                    import fcntl

                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                holder = fh.read().strip()
                fh.close()  # not ours: never removed below
                raise WsssCramError(f"Another {what} is writing into '{folder}'{f' ({holder})' if holder else ''}; "
                                    "wait for it to finish, or choose another output folder.") from None
            if _same_file(fh, path):
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(f"{what}, process {os.getpid()}")
        fh.flush()
        yield path
    finally:
        if fh is not None and not fh.closed:
            # removed while still held (a run that opened it meanwhile sees another file and retries), so a
            # finished run leaves no lock file behind in the user's folder
            with contextlib.suppress(OSError):
                if _same_file(fh, path):
                    path.unlink()
            fh.close()


def _same_file(fh: Any, path: Path) -> bool:
    """True when the open file ``fh`` is still the file at ``path`` (not removed or replaced since)."""
    try:
        a, b = os.fstat(fh.fileno()), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies under it (both resolved)."""
    return path == folder or folder in path.parents


def resolved_inputs(inputs: Iterable[str | os.PathLike | None]) -> list[Path]:
    """The inputs that exist, resolved (None and missing paths are skipped: they are checked where read)."""
    return [_resolved(p) for p in inputs if p is not None and str(p) and Path(p).exists()]


def check_output_folder(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                        what: str = "--out folder") -> Path:
    """Refuse an output folder that is an existing file, is one of ``inputs``, or lies inside an input folder
    (outputs would mix with the inputs and be read back as inputs next time). Returns it as a Path. Writes
    nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise WsssCramError(f"The {what} '{out}' is an existing file, not a folder; choose a folder.")
    target = _resolved(out)
    for inp in resolved_inputs(inputs):
        if target == inp or (inp.is_dir() and _inside(target, inp)):
            raise WsssCramError(f"The {what} '{out}' is {'the input' if target == inp else 'inside the input'} "
                                f"'{inp}'. Outputs never go into an input; choose a folder outside it.")
    return out


def check_spares_inputs(paths: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse when an output path is an input file, lies inside an input folder, or is a folder holding an
    input (writing or replacing it would change or delete that input)."""
    protected = resolved_inputs(inputs)
    for path in paths:
        target = _resolved(path)
        for inp in protected:
            if target == inp or (inp.is_dir() and _inside(target, inp)) or target in inp.parents:
                raise OutputExistsError(f"The output '{path}' would {'replace' if target == inp else 'write into'} "
                                        f"the input '{inp}'. Inputs are never overwritten: choose another output "
                                        "folder.")


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], overwrite: bool,
                      what: str = "output") -> Path:
    """One output file: not a folder, not an input nor inside one, and not existing unless ``overwrite``."""
    p = Path(path)
    check_spares_inputs([p], inputs)
    return ensure_can_write(p, overwrite)


def read_manifest(out_dir: str | os.PathLike) -> list[str] | None:
    """The relative paths an earlier run of a set-writing command recorded in ``out_dir`` (None: no manifest).
    One path per line, read exactly (names may hold spaces)."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line]


def _write_manifest(out_dir: Path, names: Iterable[str]) -> None:
    from .atomic import atomic_path

    with atomic_path(out_dir / MANIFEST_NAME) as tmp:
        tmp.write_text("".join(f"{n}\n" for n in sorted(set(names))), encoding="utf-8")


def _walk(out_dir: Path) -> Iterator[str]:
    """Every file under ``out_dir`` as a relative POSIX path, the package's hidden bookkeeping left out."""
    for root, dirs, files in os.walk(out_dir):
        rel_root = Path(root).relative_to(out_dir)
        dirs[:] = [d for d in dirs if not (rel_root == Path(".") and d.startswith(BUILD_PREFIX))]
        for f in files:
            if rel_root == Path(".") and f.startswith(OWN_HIDDEN):
                continue
            yield (rel_root / f).as_posix()


def _listing(out_dir: Path) -> list[str]:
    return sorted(_walk(out_dir))


class OutputSet:
    """A set of files a command writes into one folder (see module notes). Use::

        with OutputSet(out_dir, inputs, "wsss-cram patchify", overwrite, subfolders=("img", "mask")) as out:
            ... write files under out.build (same relative layout as the final folder) ...
            out.commit()

    Construction checks everything before any work: the folder (:func:`check_output_folder`), its planned
    ``subfolders`` against the inputs, and its content: empty, or a previous set of this kind (its manifest
    lists every file in it) which ``overwrite`` allows to replace. A folder holding files the package did not
    write is refused even with ``overwrite``: they are someone's data. ``commit`` refuses any file that would land
    on an input, removes the previous set's files (by the manifest's names only), moves the new files into place
    and writes the new manifest. Leaving the block without ``commit`` removes the build folder only.
    """

    def __init__(self, out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str,
                 overwrite: bool = False, subfolders: Iterable[str] = ()) -> None:
        inputs = list(inputs)
        self.out_dir = check_output_folder(out_dir, inputs)
        self.inputs = resolved_inputs(inputs)
        self.what = what
        self.overwrite = overwrite
        check_spares_inputs([self.out_dir / s for s in subfolders], self.inputs)
        self.previous = self._previous_set()
        self.build: Path = Path()
        self._stack = contextlib.ExitStack()

    def _previous_set(self) -> list[str]:
        out = self.out_dir
        if not out.is_dir():
            return []
        manifest = set(read_manifest(out) or ())
        present, foreign = [], []
        for name in _walk(out):  # stops early: --out may be a big folder above the inputs
            (present if name in manifest else foreign).append(name)
            if len(foreign) > 3:
                break
        if not present and not foreign:
            return []
        if foreign:
            shown = ", ".join(foreign[:3]) + (" and more" if len(foreign) > 3 else "")
            raise OutputExistsError(f"'{out}' holds files that {self.what} did not write ({shown}); it never "
                                    "deletes them, even with --overwrite. Choose an empty or new output folder.")
        if not self.overwrite:
            raise OutputExistsError(f"'{out}' holds the output of an earlier run; choose another --out or pass "
                                    "--overwrite to replace it.")
        return sorted(present)

    def __enter__(self) -> OutputSet:
        self._stack.enter_context(folder_lock(self.out_dir, self.what))
        for stale in self.out_dir.glob(f"{BUILD_PREFIX}*"):  # left by a killed run; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        self.build = Path(tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=self.out_dir))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            shutil.rmtree(self.build, ignore_errors=True)
        finally:
            self._stack.close()
        if isinstance(exc, OSError):  # a full disk, a folder made read-only mid-run: said plainly, nothing kept
            import errno

            reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc)).lower()
            raise WsssCramError(f"Cannot write into '{self.out_dir}': {reason}. Nothing was replaced; free space or "
                                "choose another output folder, then run again.") from None

    def commit(self) -> list[Path]:
        """Move the built files into place (module notes); returns their final paths."""
        new = _listing(self.build)
        finals = [self.out_dir / n for n in new]
        check_spares_inputs(finals, self.inputs)
        # the manifest names old and new files before anything moves: a run killed below leaves a folder whose
        # every file is listed, which the next --overwrite can clean exactly
        _write_manifest(self.out_dir, [*self.previous, *new])
        for name in self.previous:
            target = self.out_dir / name
            if target.is_file() or target.is_symlink():
                target.unlink()  # a hard link to an input (pseudo-labels' img/) loses the link, not the input
        for name in sorted({str(Path(n).parent) for n in self.previous} - {"."}, key=len, reverse=True):
            with contextlib.suppress(OSError):
                (self.out_dir / name).rmdir()  # only when empty
        for name, final in zip(new, finals, strict=True):
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                raise OutputExistsError(f"'{final}' appeared while {self.what} ran; not replacing it.")
            os.replace(self.build / name, final)
        _write_manifest(self.out_dir, new)
        return finals


def copy_new(src: str | os.PathLike, dst: str | os.PathLike, link: bool = True) -> Path:
    """Hard-link (``link``) or copy ``src`` to ``dst``, which must not exist: never onto an existing path (a
    hard link there would carry the copy into another input)."""
    dst = Path(dst)
    if dst.exists() or dst.is_symlink():
        raise OutputExistsError(f"'{dst}' already exists; two inputs share the name '{dst.name}'. Rename one.")
    if link:
        try:
            os.link(src, dst)
            return dst
        except OSError:
            pass
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout)
    shutil.copystat(src, dst)
    return dst
