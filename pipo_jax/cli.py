"""Shared command-line plumbing: bad input becomes a one-line error and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable

from pipo_jax.errors import USER_ERRORS, Preempted


def run_main(main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Runs ``main``; a user error prints ``error: <message>`` on stderr and exits with 2.

    Training stopped by a signal after saving (``Preempted``) prints ``preempted: <message>``
    and exits with ``128 + signal`` (143 for SIGTERM), as if the signal had killed it.
    """
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return e.exit_code
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last committed checkpoint is intact", file=sys.stderr)
        return 130
