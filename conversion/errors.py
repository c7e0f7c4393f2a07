"""The project's input errors: what a user got wrong (a config value, a path, a file), as opposed to a bug.

Programs print an `InputError` as one line on stderr and exit with code 2 (`flowsteer_jax.cli.run`); any other
exception keeps its traceback. The message names the key, flag or file and what is allowed. Here, not in
`flowsteer_jax`, so the torch- and JAX-free conversion code raises the same classes.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input, named in the message: a config key, a flag, a path or a file's contents."""


class ConversionError(InputError):
    """A checkpoint does not match what its config implies. The message names every offending key and file."""


SHORT = 200  # characters of a value that a message or log line quotes


def shorten(value: object, limit: int = SHORT) -> str:
    """`str(value)` cut to about `limit` characters, saying how much was left out.

    Messages and logs quote user values (a prompt, a key list, a config value); a 100k-character one must not
    become a 100k-character line.
    """
    text = str(value)
    if len(text) <= limit:
        return text
    head = text[: limit - limit // 4]
    tail = text[-(limit // 8) :]
    return f"{head}...[{len(text) - len(head) - len(tail)} characters left out]...{tail}"
