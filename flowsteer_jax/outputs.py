"""Where programs may write: the one containment rule, output manifests, stale temporaries, the workdir lock.

Protected folders, recognised by their layout (`protected_kind`): a diffusers model (`model_index.json`, or a
component folder with `config.json` and weight files), a training workdir (`checkpoints/` or the lock file), a
training checkpoint (an orbax step folder, or a folder of them), and another program's output (its manifest,
`MANIFEST`). The rule (`prepare_output`): an output folder is never one of them, never inside one (at any depth, after
resolving symlinks), and never one of the program's own inputs or inside one. An existing folder is used only when it
is empty or holds this program's manifest; `--overwrite` replaces such an earlier output whole, and only if every
file in it is one the manifest lists (a file the user added is never deleted). Programs that write a whole folder
(export, sample) stage it in `<out>.tmp-<host>-<pid>` and rename it into place at the end (`Output.commit`); a
program whose folder accumulates (evaluate) writes in place. Temporaries of dead processes on this host are
cleaned up by the next run on the same folder (`clean_stale`). A training workdir has its own check
(`check_workdir`) and one run at a time (`lock_workdir`).

Plain `os`/`json`: no JAX, no torch (the exporter stays numpy-only).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterable

from conversion.errors import InputError
from conversion.training_checkpoint import CHECKPOINTS, ITEMS

MANIFEST = "flowsteer-output.json"  # written by every program into its output folder
LOCK = "train.lock"  # a training workdir's lock: holder's host, pid and start time
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".gguf")
STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax writes it into every step folder
_TEMP = re.compile(r"^(?P<base>.+)\.(?P<what>tmp|old)-(?P<host>.+)-(?P<pid>\d+)$")
# How many folders a refusal's message may look through to name the protected one inside (a huge --out).
_SEARCH_BUDGET = 5000

log = logging.getLogger(__name__)


def host() -> str:
    return socket.gethostname()


def real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _names(folder: str) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def _is_step(folder: str, names: set[str]) -> bool:
    return STEP_METADATA in names or all(n in names and os.path.isdir(os.path.join(folder, n)) for n in ITEMS)


def manifest(folder: str) -> dict | None:
    """The folder's output manifest, None when it has none; an unreadable one counts as another program's."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) and "program" in data else {"program": "(unreadable manifest)"}
    except (OSError, ValueError):
        return {"program": "(unreadable manifest)"}


def protected_kind(folder: str) -> str | None:
    """What `folder` is, by its layout, when no program may write into it or delete it; None otherwise."""
    names = _names(folder)
    if not names:
        return None
    if "model_index.json" in names:
        return "a diffusers model folder"
    if "config.json" in names and any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        return "a model folder (config.json and weights)"
    if LOCK in names or (CHECKPOINTS in names and os.path.isdir(os.path.join(folder, CHECKPOINTS))):
        return "a training workdir"
    if _is_step(folder, names):
        return "a training checkpoint"
    steps = [n for n in names if n.isdigit() and os.path.isdir(os.path.join(folder, n))]
    if any(_is_step(os.path.join(folder, n), _names(os.path.join(folder, n))) for n in steps):
        return "a folder of training checkpoints"
    if MANIFEST in names:
        return f"the output of {manifest(folder)['program']}"
    return None


def _ancestors(path: str) -> Iterable[str]:
    """`path`'s folders from its parent up to the root."""
    parent = os.path.dirname(path)
    while parent != path:
        yield parent
        path, parent = parent, os.path.dirname(parent)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _protected_inside(folder: str) -> tuple[str, str] | None:
    """A protected folder strictly inside `folder` (symlinks not followed), within a search budget."""
    budget = _SEARCH_BUDGET
    for dirpath, dirnames, _ in os.walk(folder):
        for name in list(dirnames):
            sub = os.path.join(dirpath, name)
            what = protected_kind(sub)
            if what is not None:
                return sub, what
        budget -= 1
        if budget <= 0:
            return None
    return None


def _input_folders(inputs: Iterable[str | None]) -> dict[str, str]:
    """Real path -> the input it is, for each input and the folders its files' symlinks point into (a hub cache)."""
    out: dict[str, str] = {}
    for path in inputs:
        if not path or not os.path.exists(path):
            continue
        out.setdefault(real(path), path)
        if os.path.isdir(path):
            for name in _names(path):
                if os.path.islink(os.path.join(path, name)):
                    out.setdefault(os.path.dirname(real(os.path.join(path, name))), f"{path} (its {name})")
    return out


def check_output(out: str, program: str, *, overwrite: bool | None, inputs: Iterable[str | None] = ()) -> str:
    """The real path `program` may write its output folder `out` to, or InputError naming `out` and why not.

    Refused whatever `overwrite` says: `out` inside a protected folder (`protected_kind`), `out` being or holding
    one (other than `program`'s own earlier output), and `out` being or inside one of `inputs` (or a folder their
    files link into), or holding one when it would be replaced. An existing `out` must be empty, hold `program`'s
    manifest of a failed run, or (with `overwrite`) hold `program`'s earlier output and only the files its
    manifest lists. `overwrite=None`: not decided yet, refuse only what `--overwrite` would not allow.
    """
    flag = f"--out={out}"
    path = real(out)
    never = "never written to, even with --overwrite (choose another --out)"
    for folder in (path, *_ancestors(path)):
        what = protected_kind(folder)
        if what is None or (folder == path and what == f"the output of {program}"):
            continue
        where = "is" if folder == path else "is inside"
        raise InputError(f"{flag} {where} {what} ({folder}); {never}")
    for folder, what in _input_folders(inputs).items():
        if _within(path, folder):
            where = "is" if path == folder else "is inside"
            raise InputError(f"{flag} {where} the input {what}; a program never writes over what it reads: {never}")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise InputError(f"{flag} exists and is not a folder")
    if not _names(path):
        return path
    record = manifest(path)
    inside = _protected_inside(path) if record is None or record.get("files") is None else None
    if inside is not None:
        raise InputError(f"{flag} holds {inside[1]} ({inside[0]}); {never}")
    if record is None:  # (another program's output was refused above, as a protected folder)
        raise InputError(
            f"{flag} exists, is not empty and is not an output of {program} (no {MANIFEST}); it is never replaced "
            "(choose another --out)"
        )
    if record.get("files") is None:  # an accumulating output (evaluate's): written into again
        return path
    extra = sorted(set(_files(path)) - set(record["files"]))
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise InputError(f"{flag} holds files {program} did not write ({shown}); it is never replaced (move them away)")
    if record.get("complete") is False:  # a failed run's log: nothing to lose
        return path
    held = [what for folder, what in _input_folders(inputs).items() if _within(folder, path)]
    if held:  # replacing it would delete what this run reads
        raise InputError(f"{flag} holds the input {held[0]}; a program never writes over what it reads: {never}")
    if overwrite is False:
        raise InputError(f"{flag} holds an earlier output of {program}; pass --overwrite to replace it (all of it)")
    return path


def _files(folder: str) -> list[str]:
    """Every file (and symlink) under `folder`, relative to it."""
    out = []
    for dirpath, dirnames, names in os.walk(folder):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        out += [os.path.relpath(os.path.join(dirpath, n), folder) for n in names + links]
    return sorted(out)


def log_name(program: str) -> str:
    """`flowsteer_jax.export` -> `export.log`: the program's log file in its output folder or workdir."""
    return f"{program.rsplit('.', 1)[-1]}.log"


def temp_path(path: str, what: str = "tmp") -> str:
    """`<path>.tmp-<host>-<pid>`: this process's temporary for `path` (`clean_stale` can tell whose it is)."""
    return f"{path.rstrip(os.sep)}.{what}-{host()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(path: str) -> list[str]:
    """Remove the temporaries `<path>.tmp-*` of dead processes on this host, and settle their `<path>.old-*`
    (an output moved aside while being replaced: back into place when nothing took its place, else deleted).
    Returns what was removed or restored."""
    parent, base = os.path.split(path.rstrip(os.sep))
    done = []
    for name in sorted(_names(parent or ".")):
        m = _TEMP.match(name)
        if not m or m["base"] != base or m["host"] != host() or pid_alive(int(m["pid"])):
            continue
        stale = os.path.join(parent, name)
        if m["what"] == "old" and not os.path.lexists(path):
            os.rename(stale, path)
        elif os.path.isdir(stale) and not os.path.islink(stale):
            shutil.rmtree(stale)
        else:
            os.remove(stale)
        done.append(stale)
    return done


class Output:
    """An output folder a program writes (`prepare_output`). `dir` is where to write now, `log_file` its log.

    Staged (a whole folder, replaced at once): `dir` is `<out>.tmp-<host>-<pid>`; `commit()` writes the manifest
    and renames it into place (an earlier output is moved aside first, deleted after). As a context manager, an
    exception before `commit()` deletes the staged files and keeps only the log, in `path` (a new folder holding
    the log and a manifest of the failed run, or appended to the earlier output's log); the exception's
    `log_file` then names it. In place (accumulating): `dir` is `path`, the manifest is written at once.
    """

    def __init__(self, path: str, program: str, staged: bool):
        self.path, self.program, self.staged = path, program, staged
        self.dir = temp_path(path) if staged else path
        self.log_file = os.path.join(self.dir, log_name(program))
        self.committed = False
        if staged and os.path.lexists(self.dir):  # this process's own, from an earlier call
            shutil.rmtree(self.dir)
        os.makedirs(self.dir, exist_ok=True)
        earlier = os.path.join(path, log_name(program))
        self._carried = 0
        if staged and os.path.isfile(earlier):  # the log is the folder's history: carried over
            shutil.copyfile(earlier, self.log_file)
            self._carried = os.path.getsize(self.log_file)
        if not staged:
            self._write_manifest(self.dir, files=None, complete=True)

    def _write_manifest(self, folder: str, *, files: list[str] | None, complete: bool) -> None:
        record = {
            "program": self.program,
            "complete": complete,
            "files": files,
            "host": host(),
            "pid": os.getpid(),
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "argv": sys.argv,
        }
        with open(os.path.join(folder, MANIFEST), "w") as f:
            json.dump(record, f, indent=2)

    def commit(self) -> None:
        """Staged: the manifest (every file written), then the folder into place."""
        if not self.staged:
            return
        self._write_manifest(self.dir, files=[*_files(self.dir), MANIFEST], complete=True)
        replace(self.dir, self.path)
        self.committed = True
        self.log_file = os.path.join(self.path, log_name(self.program))

    def __enter__(self) -> Output:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if not self.staged or self.committed:
            return
        final = os.path.join(self.path, log_name(self.program))
        if manifest(self.path) is not None:  # an earlier output stays; this attempt's log is appended to its log
            if os.path.isfile(self.log_file):
                with open(self.log_file, "rb") as src, open(final, "ab") as dst:
                    src.seek(self._carried)
                    dst.write(src.read())
            shutil.rmtree(self.dir)
        else:  # nothing (or an empty folder) here before: the folder keeps the log and a failed run's manifest
            for name in _names(self.dir) - {log_name(self.program)}:
                target = os.path.join(self.dir, name)
                shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.remove(target)
            self._write_manifest(self.dir, files=[log_name(self.program), MANIFEST], complete=False)
            os.rename(self.dir, self.path)
        self.log_file = final
        if exc is not None:
            exc.log_file = final


def prepare_output(
    out: str, program: str, *, overwrite: bool = False, inputs: Iterable[str | None] = (), staged: bool = True
) -> Output:
    """`check_output`, clean the folder's stale temporaries (which may put back an output), check again, and start
    an `Output` there."""
    path = check_output(out, program, overwrite=overwrite, inputs=inputs)
    for stale in clean_stale(path):
        print(f"{program}: settled a dead process's temporary {stale}", file=sys.stderr)
    return Output(check_output(out, program, overwrite=overwrite, inputs=inputs), program, staged)


def replace(tmp: str, out: str) -> None:
    """Move the finished folder `tmp` to `out`: an existing `out` is moved aside first and deleted after."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    old = temp_path(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old)


# --- training workdirs ---


def check_workdir(workdir: str) -> str:
    """The real path of `workdir` if a training run may use it; InputError naming it and why not.

    A workdir is new (absent or empty) or a training workdir (resumed). Never inside a model, a checkpoint or an
    output, never one of them, and never a non-empty folder of something else (its files would be overwritten).
    Inside another workdir it may be (not in its checkpoints): the ablation's runs live in `WORKDIR/ablation/`.
    """
    flag = f"--workdir={workdir}"
    path = real(workdir)
    for folder in _ancestors(path):
        what = protected_kind(folder)
        if what not in (None, "a training workdir"):
            raise InputError(f"{flag} is inside {what} ({folder}); a run never writes there (choose another --workdir)")
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise InputError(f"{flag} exists and is not a folder")
    what = protected_kind(path)
    if what == "a training workdir" or not _names(path):
        return path
    if what is None:
        what = "a non-empty folder that is not a training workdir (no checkpoints/)"
    raise InputError(f"{flag} is {what}; a run never writes there (choose another --workdir)")


def lock_workdir(workdir: str) -> str:
    """Take `WORKDIR/train.lock` (host, pid, start time); returns its path.

    InputError naming the holder when a live run holds it (or one on another host: its liveness cannot be
    checked here). A lock of a dead process on this host is taken over, with a warning."""
    path = os.path.join(workdir, LOCK)
    record = {
        "host": host(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:
                raise InputError(
                    f"--workdir={workdir}: its lock {path} is unreadable; if no run uses this workdir, delete it"
                ) from None
            who = f"host {holder['host']}, pid {holder['pid']}, started {holder.get('started', '?')}"
            if holder["host"] != host() or pid_alive(int(holder["pid"])):
                raise InputError(
                    f"--workdir={workdir} is in use by another training run ({who}; lock {path}); one run per "
                    "workdir: wait for it, or if it is dead, delete the lock"
                ) from None
            log.warning("--workdir=%s: taking over the lock of a dead run (%s; %s)", workdir, who, path)
            try:  # atomic: of two runs taking over the same stale lock, one renames it, the other finds it gone
                os.rename(path, temp_path(path, "stale"))
                os.remove(temp_path(path, "stale"))
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return path
    raise InputError(f"--workdir={workdir}: another run took its lock {path} at the same time")


def _read_lock(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) and {"host", "pid"} <= data.keys() else None
    except (OSError, ValueError):
        return None


def unlock_workdir(path: str) -> None:
    """Remove the lock at `path` when this process holds it."""
    holder = _read_lock(path)
    if holder is not None and holder["host"] == host() and int(holder["pid"]) == os.getpid():
        os.remove(path)
