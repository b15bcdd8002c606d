"""How the command-line entry points fail: a user's mistake prints one `error:` line, a bug its traceback.

    python -m agents.rlhf --ppo.num-envs 0     ->  error: num_envs (0) and num_steps (34) must be >= 1   (exit 2)
    python -m agents.ppo --advantages bogus    ->  error: invalid choice 'bogus' for argument '--advantages'. ...

An exception is a user error when it carries a true `user_error` class attribute: `UsageError` here, and the
data/model errors of `textenv` (whose library modules do not import `agents`, so they carry the same marker
themselves). A flag that tyro rejects becomes one too when the CLI parses with `parse_cli`; `check_fields`
refuses a config field whose value does not have its annotated type or `Literal` choice (`Args(total_timesteps=1e6)`).

This module imports the standard library alone, so the third CLI, `python -m textenv.build`, uses `run_cli` and
`parse_cli` too without pulling in the learning side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import numbers
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class UsageError(ValueError):
    """A bad flag value, missing data, a corrupt checkpoint or model folder: the message says what to do."""

    user_error = True


def is_user_error(exc: BaseException) -> bool:
    """True for exceptions that mark themselves as the user's mistake (`user_error = True`)."""
    return bool(getattr(exc, "user_error", False))


def run_cli(main: Callable[[], T]) -> T:
    """Run `main()`; a user error becomes `error: <message>` on stderr and exit status 2, no traceback."""
    try:
        return main()
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def parse_cli(*args: Any, **kwargs: Any) -> Any:
    """`tyro.cli(*args, **kwargs)`, except that a rejected command line (a bad value, an unknown flag) raises a
    `UsageError` with tyro's message on one line instead of printing tyro's box and exiting.

    tyro prints its box to stderr, then raises SystemExit(2): stderr is held while it parses, and what it printed
    on the way to a result or to `--help` (exit 0) is passed on unchanged."""
    import tyro

    held, rejected = io.StringIO(), False
    try:
        with contextlib.redirect_stderr(held):
            return tyro.cli(*args, **kwargs)
    except SystemExit as exc:
        rejected = exc.code not in (0, None)
        if rejected:
            raise UsageError(tyro_message(held.getvalue())) from None
        raise
    finally:
        if not rejected:
            sys.stderr.write(held.getvalue())


def tyro_message(text: str) -> str:
    """tyro's error box as one line: the message above the box's first rule (the flag and what is wrong with it;
    the argument's help text below it is left out), then the help command the box names. Text without a box
    (argparse's `prog: error: ...`) gives its last `error:` message."""
    rows = [row.strip().strip("│").strip() for row in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()]
    rows = [row for row in rows if row]
    help_cmd = re.search(r"For full helptext, (?:run|see) (.+? --help)", " ".join(rows))
    if rows and rows[0].startswith("╭"):
        title, body = rows[0].strip("╭╮─ "), []
        for row in rows[1:]:
            if set(row) <= set("─╰╯"):  # a rule (or the bottom): the help text follows
                break
            body.append(row)
        message = " ".join(body) or title
    else:
        errors = [row.split("error: ", 1)[1] for row in rows if "error: " in row]
        message = errors[-1] if errors else " ".join(rows) or "the command line was rejected"
    message = re.sub(r"\s+", " ", message).strip()
    return f"{message} (see `{help_cmd.group(1)}`)" if help_cmd else message


def check_fields(config: object) -> None:
    """Raise `UsageError` naming the first field of the dataclass `config` whose value does not fit its annotation:
    a `Literal` outside its choices, a str, bool, int or float (an int is a float) of another type, a `X | None`
    that is neither. Other annotations (tuples, nested configs) are left to their own checks."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, hint = getattr(config, field.name), hints[field.name]
        if typing.get_origin(hint) is Literal:
            if value not in typing.get_args(hint):
                raise UsageError(f"{field.name} = {value!r} is not one of {typing.get_args(hint)}")
            continue
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if not all(t in _KINDS or t is type(None) for t in options):
            continue
        if not any(value is None if t is type(None) else _KINDS[t](value) for t in options):
            kinds = " or ".join("None" if t is type(None) else t.__name__ for t in options)
            raise UsageError(f"{field.name} = {value!r} is a {type(value).__name__}; it must be {kinds}")


_KINDS = {  # annotation -> what a value of it may be (bool is an int to Python: not here)
    str: lambda v: isinstance(v, str),
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
    float: lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
}
