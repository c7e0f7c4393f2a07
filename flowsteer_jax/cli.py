"""One flag library for every program: absl flags, each parse on its own `flags.FlagValues`.

A program writes its flags as a function of a `FlagValues` (`flags.DEFINE_*(..., flag_values=fv)`) and parses
with `parse(define, argv, prog=..., doc=__doc__)`: every call defines them afresh on a new `FlagValues`, so
`main(argv)` can run many times in one process (the tests do) and never touches absl's global `flags.FLAGS`
(the trainer's, with its `--config` file flag). `argv` excludes the program name (`None`: `sys.argv[1:]`).

- `--help` (`-h`, `--helpfull`): the module docstring and the flags, exit code 0;
- a bad flag (unknown, ill-typed, a required one missing, a stray positional argument): one line
  `PROG: bad flag: ...` on stderr, exit code 2 (as the trainer's);
- the values come back as a namespace (`args.steps`; a dashed name such as `--shard-mb` as `args.shard_mb`);
- `run(prog, main)`: the project's input errors (`conversion.errors.InputError`: bad config values, paths, files,
  weights; and missing files) as one line `PROG: error: ...` on stderr, exit code 2; other exceptions (bugs)
  keep their traceback.
- `log_to(path)`: the program's log file (in its output folder or workdir: `flowsteer_jax`'s log records, the
  start, the end or the failure with its traceback). An exception leaving it carries `log_file`, and its one
  line ends with `(log: PATH)`.

Imports absl and `conversion.errors` only: programs that must stay torch- or jax-free can use it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import traceback
import types
from collections.abc import Callable, Iterator, Sequence

from absl import flags

from conversion.errors import InputError

# What a program reports in one line (exit code 2) rather than as a traceback.
INPUT_ERRORS = (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError)

HELP = ("--help", "-help", "-h", "--helpshort", "--helpfull")


def fail(prog: str, message: str) -> None:
    """One line on stderr and exit code 2: a bad flag, as a program reports it."""
    message = " ".join(str(message).split())
    print(f"{prog}: bad flag: {message} (see --help)", file=sys.stderr)
    raise SystemExit(2)


def error(prog: str, message: object) -> int:
    """One line on stderr for a bad input (not a flag), naming the log when `message` is an exception that left
    one (`log_to`); returns exit code 2."""
    print(f"{prog}: error: {' '.join(str(message).split())}{log_note(message)}", file=sys.stderr)
    return 2


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
    """`main()`, with the project's input errors reported as one line and exit code 2 (`INPUT_ERRORS`)."""
    try:
        return int(main() or 0)
    except INPUT_ERRORS as e:
        return error(prog, e)


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
    if positional:
        values["positional"] = rest
    elif rest:
        fail(prog, f"unexpected arguments {rest}")
    return types.SimpleNamespace(**values)
