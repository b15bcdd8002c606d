"""How the command-line entry points fail: a user's mistake prints one `error:` line, a bug its traceback.

    python -m agents.rlhf --ppo.num-envs 0   ->  error: num_envs (0) and num_steps (34) must be >= 1   (exit 2)

An exception is a user error when it carries a true `user_error` class attribute: `UsageError` here, and the
data/model errors of `textenv` (which cannot import `agents`, so they carry the same marker themselves).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

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
