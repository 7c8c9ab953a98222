"""The one-line error: how a failure is told to the user, in every script.

A user reads one line naming the file and the problem, `error: <path>: <what>`, and the script
exits non-zero; tracebacks are for bugs, not for bad input, a full disk or a dead worker.
"""

import argparse
import errno
import os
import sys

# TensorFlow's own header line, which says nothing about the cause
_TENSORFLOW_HEADERS = ("Graph execution error:",)


def gist(error, last=False):
    """One line that says why `error` happened: the OS's words for an OSError, otherwise the first
    (or, with `last`, the final) meaningful line of its message, or its type's name."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(getattr(error, "message", None) or error)
    if os.strerror(errno.ENOSPC) in text:  # TensorFlow wraps a full disk in pages of context
        return os.strerror(errno.ENOSPC)
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and line.strip() not in _TENSORFLOW_HEADERS]
    if not lines:
        return type(error).__name__
    return lines[-1] if last else lines[0]


def shown(text):
    """`text` as one line any terminal or log can take: the bytes of a file name that are not UTF-8
    (which Python keeps as lone surrogates, and which no UTF-8 stream can print) as `\\xff`, and
    control characters (a newline in a file name would split the line) as `\\n`, `\\x1b`."""
    text = str(text)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no byte stands for
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if text.isprintable():
        return text
    return "".join(character if character.isprintable() else character.encode("unicode_escape").decode("ascii")
                   for character in text)


def with_path(path, error):
    """`path: why` for an error met while handling `path` (the path is not repeated if the message
    already starts with it); a ValueError is the user's problem and keeps its words, any other
    error is named by its type."""
    message = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {gist(error)}"
    path = str(path)
    return shown(message if message.startswith(path) else f"{path}: {message}")


def fail(message, status=1, at_once=False):
    """Ends the script with `error: message` on stderr and a non-zero exit status. With status 1 the
    message travels in SystemExit, as sys.exit(text) does, so a caller of main() can read it. With
    at_once, the process ends right after the line (processes.exit_at_once: no teardown)."""
    message = shown(message)
    if at_once:
        from fcdn.common.processes import exit_at_once

        print(f"error: {message}", file=sys.stderr, flush=True)
        exit_at_once(status)
    if status == 1:
        raise SystemExit(f"error: {message}")
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


class OneLineArgumentParser(argparse.ArgumentParser):
    """A flag mistake is one line, `error: ...`, exit status 2, like every other mistake a script
    reports (the usage is one --help away). Defaults show in --help; --version prints the package's."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        from fcdn import __version__  # every script answers --version the same way

        self.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    def error(self, message):
        self.exit(2, f"error: {message}\n")
