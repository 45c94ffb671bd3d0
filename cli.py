"""The command line and its error boundary: each mistake a user can make ends a program with one line
("train.py: ..."), never a traceback."""
import argparse
import errno
import math
import sys


class SampleError(ValueError):
    """A sample that cannot be used; the message names it."""


# ----------------------------------------------------------------------------------------------
# The command line: one line for each mistake
# ----------------------------------------------------------------------------------------------

def cli(main, program):
    """Run a program's main(): a message that ends it, a file that cannot be read or written (missing,
    a folder, read-only, a full disk) and a bad sample each become one line, "program: ...", exit 1."""
    try:
        main()
    except SystemExit as e:
        if isinstance(e.code, str) and not e.code.startswith(program):
            raise SystemExit(f"{program}: {e.code}") from None
        raise
    except (OSError, SampleError) as e:
        raise SystemExit(f"{program}: {one_line(e)}") from None
    except KeyboardInterrupt:
        print(f"{program}: stopped by Ctrl-C", file=sys.stderr)
        sys.exit(130)


def one_line(e):
    """An error as one line; an OSError names its file, and a full disk says so."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
        return text + (" (the disk is full)" if e.errno == errno.ENOSPC else "")
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def number(kind, low, high=math.inf, above=False):
    """An argparse type: a finite int or float from `low` (or above it) to `high`."""
    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and (value > low if above else value >= low) and value <= high):
            most = f" and at most {high}" if high < math.inf else ""
            raise argparse.ArgumentTypeError(f"{text}: must be {'above' if above else 'at least'} {low}{most}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return parse


def causes(e):
    """An error, the errors it wraps (DCP's failures of each rank) and what caused each, outermost first."""
    todo, found = [e], []
    while todo:
        x = todo.pop(0)
        if x is not None and not any(x is y for y in found):
            found.append(x)
            failures = getattr(x, "failures", None) or {}  # CheckpointException: {rank: error}
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()] + [x.__cause__, x.__context__]
    return found
