"""One flag library for every program: absl flags, each parse on its own `flags.FlagValues`.

A program writes its flags as a function of a `FlagValues` (`flags.DEFINE_*(..., flag_values=fv)`) and parses
with `parse(define, argv, prog=..., doc=__doc__)`: every call defines them afresh on a new `FlagValues`, so
`main(argv)` can run many times in one process (the tests do) and never touches absl's global `flags.FLAGS`
(the trainer's, with its `--config` file flag). `argv` excludes the program name (`None`: `sys.argv[1:]`).

- `--help` (`-h`, `--helpfull`): the module docstring and the flags, exit code 0;
- a bad flag (unknown, ill-typed, a required one missing, a stray positional argument): one line
  `PROG: bad flag: ...` on stderr, exit code 2 (as the trainer's);
- the values come back as a namespace (`args.steps`; a dashed name such as `--shard-mb` as `args.shard_mb`);
- a float flag set to NaN or an infinity: a bad flag too (`--guidance=nan` would otherwise sample unguided);
- `run(prog, main)`: the project's input errors (`conversion.errors.InputError`: bad config values, paths, files,
  weights; and missing files) and a full disk (`OSError` ENOSPC/EDQUOT, also as the cause of another error) as
  one line `PROG: error: ...` on stderr, exit code 2; other exceptions (bugs) keep their traceback. Raisers cut
  the long values they quote (`conversion.errors.shorten`); a line is cut at `LINE` characters as a last resort.
- `log_to(path)`: the program's log file (in its output folder or workdir: `flowsteer_jax`'s log records, the
  start, the end or the failure with its traceback). An exception leaving it carries `log_file`, and its one
  line ends with `(log: PATH)`.

Imports absl and `conversion.errors` only: programs that must stay torch- or jax-free can use it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import sys
import traceback
import types
from collections.abc import Callable, Iterator, Sequence

from absl import flags

from conversion.errors import InputError, shorten

# What a program reports in one line (exit code 2) rather than as a traceback.
INPUT_ERRORS = (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError)

LINE = 2000  # the longest one-line error a program prints (a 100k-character prompt is cut, not printed)

HELP = ("--help", "-help", "-h", "--helpshort", "--helpfull")


def fail(prog: str, message: str) -> None:
    """One line on stderr and exit code 2: a bad flag, as a program reports it."""
    message = " ".join(shorten(message, LINE).split())
    print(f"{prog}: bad flag: {message} (see --help)", file=sys.stderr)
    raise SystemExit(2)


def error(prog: str, message: object) -> int:
    """One line on stderr for a bad input (not a flag), naming the log when `message` is an exception that left
    one (`log_to`); returns exit code 2."""
    print(f"{prog}: error: {' '.join(shorten(message, LINE).split())}{log_note(message)}", file=sys.stderr)
    return 2


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# How libraries that do not raise OSError say it (orbax's tensorstore: a ValueError "... No space left on device").
DISK_FULL_TEXT = tuple(os.strerror(n) for n in DISK_FULL)


def disk_full(e: BaseException) -> str | None:
    """What `e` says about a full disk (or a quota), where it is or was raised from one; None otherwise."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return f"writing {e.filename}: {e.strerror}" if e.filename else str(e.strerror)
        if any(text in str(e) for text in DISK_FULL_TEXT):
            return shorten(" ".join(str(e).split()), 400)
        e = e.__cause__ or e.__context__
    return None


class DiskFullFilter(logging.Filter):
    """Drops the log records of a full disk (orbax logs each failed background write with its traceback): the
    program reports it once, in one line (`report`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info and record.exc_info[1] is not None else None
        full = (error is not None and disk_full(error)) or any(t in record.getMessage() for t in DISK_FULL_TEXT)
        return not full


def report(prog: str, e: BaseException) -> int | None:
    """Exit code 2 and one line for an input error or a full disk; None for anything else (a bug: re-raise it)."""
    if isinstance(e, INPUT_ERRORS):
        return error(prog, e)
    full = disk_full(e)
    if full is not None:
        return error(prog, f"{full}; free some space and run again{log_note(e)}")
    return None


def log_note(exc: object) -> str:
    """` (log: PATH)` for an exception that left a program's log file (`log_to`), else ``."""
    path = getattr(exc, "log_file", None)
    return f" (log: {path})" if path else ""


@contextlib.contextmanager
def log_to(path: str) -> Iterator[None]:
    """Log the `flowsteer_jax` loggers' records (at the level the program set) to the file `path` (appended)
    while inside, after a start line with the command; an exception leaving it is logged there (a bug with its
    traceback) and carries `log_file` = `path`."""
    logger = logging.getLogger("flowsteer_jax")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)

    def line(level: int, text: str) -> None:  # to the file only: stderr already shows what the program says
        handler.handle(logger.makeRecord(logger.name, level, __file__, 0, text, None, None))

    line(logging.INFO, f"start: {' '.join(sys.argv)}")
    try:
        yield
    except BaseException as e:
        if not isinstance(e, INPUT_ERRORS):
            line(logging.ERROR, "".join(traceback.format_exception(e)).rstrip())
        line(logging.ERROR, f"failed: {' '.join(str(e).split()) or type(e).__name__}")
        if not getattr(e, "log_file", None):
            e.log_file = path
        raise
    else:
        line(logging.INFO, "done")
    finally:
        logger.removeHandler(handler)
        handler.close()


def run(prog: str, main: Callable[[], int | None]) -> int:
    """`main()`, with the project's input errors and a full disk reported as one line and exit code 2 (`report`)."""
    try:
        return int(main() or 0)
    except Exception as e:
        code = report(prog, e)
        if code is None:
            raise
        return code


def help_text(fv: flags.FlagValues, doc: str | None) -> str:
    """The docstring, then every flag (absl's help without its per-module headings)."""
    lines = fv.get_help(prefix="", include_special_flags=False).splitlines()
    listing = "\n".join(line for line in lines if line.startswith(" "))
    return f"{(doc or '').strip()}\n\nflags:\n{listing}\n"


def parse(
    define: Callable[[flags.FlagValues], None],
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    doc: str | None = None,
    positional: bool = False,
) -> types.SimpleNamespace:
    """Define the flags on a fresh `FlagValues`, parse `argv` and return the values as a namespace.

    `positional`: keep the arguments that are not flags as `args.positional` (otherwise they are bad flags).
    """
    fv = flags.FlagValues()
    define(fv)
    argv = list(sys.argv[1:] if argv is None else argv)
    options = argv[: argv.index("--")] if "--" in argv else argv
    if any(a in HELP for a in options):
        print(help_text(fv, doc), end="")
        raise SystemExit(0)
    try:
        rest = fv([prog, *argv])[1:]
    except flags.Error as e:
        missing = re.search(r"Flag --([\w-]+) must have a value other than None", str(e))
        fail(prog, f"--{missing.group(1)} is required" if missing else str(e))
    values = {name.replace("-", "_"): fv[name].value for name in fv}
    for name in fv:
        value = fv[name].value
        if isinstance(value, float) and not math.isfinite(value):
            fail(prog, f"--{name}={value}: must be a finite number")
    if positional:
        values["positional"] = rest
    elif rest:
        fail(prog, f"unexpected arguments {rest}")
    return types.SimpleNamespace(**values)
