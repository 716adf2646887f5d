"""A run's output files as one unit: every destination checked before any work, then all written
to temporary files, then all renamed. A failure or Ctrl-C before the renames leaves nothing.

    outs = OutputSet(overwrite)
    outs.input(lora, "--lora"); outs.input(target, "--target_model")    # what must never be written
    outs.add(save_to, "--save_to"); outs.add(report, "--report")        # checked now, written later
    ...work...
    with outs.writing():                  # temporaries removed if the body fails
        outs.stage(save_to, lambda tmp: write_lora(tmp, ..., overwrite=True))
        outs.stage(report, lambda tmp: write_json(reports, tmp))
    # the renames happen when the block ends without an error

Any writer that takes a path fits (a transfer method's extra outputs, e.g. a loss-curve plot, go
through the same set). Checks, in order, each one LoraxInputError line naming the file and the flag:
an output that is an input or lies inside an input folder (also through a symlink or a hard link:
`--overwrite` would replace the user's model or adapter), two outputs naming one file, then the
usual `check_writable` (a folder, exists without --overwrite, folder missing or read-only).

What a SIGKILL can leave: temporaries (``.<name>.<pid>-<random>.tmp<suffix>``, removed by the next
run that writes that name, see `atomic.sweep_stale`) and, if it lands between two renames
(microseconds), the earlier outputs complete and the later ones absent. Each output then has a
``.<name>.<pid>-renaming.tmp`` mark beside it, made just before the renames and removed after them:
a mark of a dead process says the file belongs to a set that was never finished, so the next run
replaces it without --overwrite instead of stopping at "output exists". Never a partial file under
a final name.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..errors import LoraxInputError
from ..formats.atomic import check_writable, stale_temps, sweep_stale, temp_path

RENAMING = "renaming"  # the mark's tag (see the module docstring)


def _same_file(a: Path, b: Path) -> bool:
    """Same file by inode when both exist (symlinks, hard links), else by resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _mark(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{RENAMING}.tmp")


def left_by_unfinished_set(path: Path) -> bool:
    """`path` was renamed into place by a run killed before it renamed the rest of its outputs."""
    return any(p.name.endswith(f"-{RENAMING}.tmp") for p in stale_temps(path))


def _inside(path: Path, folder: Path) -> bool:
    """`path` lies under `folder` (resolved, so a symlinked parent counts)."""
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


class OutputSet:
    """The outputs of one run, checked together up front and written together at the end."""

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._inputs: list[tuple[Path, str]] = []
        self._outputs: list[tuple[Path, str]] = []
        self._staged: list[tuple[Path, Path]] = []  # (temporary, final)
        self._writing = False

    def input(self, path: str | os.PathLike, what: str) -> None:
        """Register an input file or folder (what: its flag, for messages); outputs may not touch it."""
        self._inputs.append((Path(path), what))

    def add(self, path: str | os.PathLike, what: str) -> Path:
        """Check one destination against the inputs, the other outputs and the file system."""
        path = Path(path)
        for inp, inp_what in self._inputs:
            if inp.is_dir():
                if _inside(path, inp) or _same_file(path, inp):
                    raise LoraxInputError(f"{path}: {what} lies inside the {inp_what} folder {inp}; "
                                          f"choose an output outside the inputs")
            elif _same_file(path, inp):
                how = "" if path.resolve() == inp.resolve() and not path.is_symlink() else \
                    " (through a symlink or a hard link)"
                raise LoraxInputError(f"{path}: {what} is the {inp_what} file {inp}{how}; writing it would "
                                      f"replace an input, choose another output")
        for out, out_what in self._outputs:
            if _same_file(path, out):
                both = what if what == out_what else f"{out_what} and {what}"
                raise LoraxInputError(f"{path}: {both} name the same file ({out}); give each output its own path")
        check_writable(path, self.overwrite or (path.is_file() and left_by_unfinished_set(path)))
        self._outputs.append((path, what))
        return path

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self._outputs]

    @contextmanager
    def writing(self) -> Iterator["OutputSet"]:
        """Stage outputs inside the block; all are renamed into place when it ends without an error,
        and every temporary is removed when it does not (also on Ctrl-C)."""
        self._writing = True
        self._staged = []
        try:
            yield self
            self._commit()
        finally:
            self._writing = False
            self._discard()

    def stage(self, path: str | os.PathLike, write: Callable[[Path], object]) -> None:
        """Run `write(tmp)` into a temporary file beside the planned output `path`."""
        path = Path(path)
        if not self._writing:
            raise RuntimeError("OutputSet.stage outside `with writing()`")
        if all(not _same_file(path, p) for p in self.paths):
            raise RuntimeError(f"{path}: not a planned output (add it before the work)")
        sweep_stale(path)  # leftovers of a killed run writing this name
        try:
            tmp = temp_path(path)
        except OSError as exc:
            raise LoraxInputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        self._staged.append((tmp, path))
        try:
            write(tmp)
            if not tmp.is_file():
                raise LoraxInputError(f"{path}: the writer left no file")
        except OSError as exc:  # disk full, a folder changed meanwhile: one line, nothing left
            raise LoraxInputError(f"{path}: cannot write ({exc.strerror or exc})") from None

    def _commit(self) -> None:
        """Rename every staged file into place. The marks of renamed outputs stay when this is cut
        short (an error, Ctrl-C, a kill): once this process is gone they let the next run replace
        those outputs (see `left_by_unfinished_set`)."""
        marks: list[Path] = []
        done = 0
        try:
            if len(self._staged) > 1:  # a single output is renamed in one step: nothing can be half done
                for _, final in self._staged:
                    marks.append(_mark(final))
                    marks[-1].touch()
            for tmp, final in self._staged:
                os.replace(tmp, final)
                done += 1
        except OSError as exc:
            for m in marks[done:]:
                m.unlink(missing_ok=True)
            raise LoraxInputError(f"{self._staged[done][1]}: cannot write ({exc.strerror or exc}); "
                                  f"{done} of {len(self._staged)} outputs were already in place") from None
        for m in marks:
            m.unlink(missing_ok=True)
        self._staged = []

    def _discard(self) -> None:
        for tmp, _ in self._staged:
            try:
                tmp.unlink()
            except OSError:
                pass
        self._staged = []
