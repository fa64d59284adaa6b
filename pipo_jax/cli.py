"""Shared command-line plumbing: bad input becomes a one-line error and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable

from pipo_jax.errors import USER_ERRORS, ConfigError, Preempted


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


def check_utf8(text: str | None, what: str, error: type[Exception] = ConfigError) -> None:
    """Raises ``error`` naming the option ``what`` when ``text`` is not UTF-8: bytes that are
    not UTF-8 reach ``sys.argv`` as lone surrogates (``surrogateescape``), which no tokenizer
    can encode. None (an option not given) passes."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text.encode("utf-8", "surrogateescape")
        try:
            raw.decode("utf-8")
            where = f"character {e.start}"  # a surrogate that did not come from a byte
        except UnicodeDecodeError as d:
            where = f"byte 0x{raw[d.start]:02x} at offset {d.start}"
        raise error(f"{what} is not valid UTF-8 text ({where}); pass UTF-8 text (check the "
                    "encoding of the terminal or script that sends it, e.g. LANG=C.UTF-8)"
                    ) from None


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str, what: str, error: type[ConfigError] = ConfigError) -> int:
    """A byte size given on a command line: ``"80GiB"``, ``"95 GB"``, ``"500MiB"``, ``"1e6"``,
    ``"4096"`` → bytes (GB = 10⁹ as in transformers, GiB = 2³⁰). Anything else, or a size below
    one byte, raises ``error`` naming the option ``what``."""
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    try:
        value = float(number) * _BYTE_UNITS[unit]
    except (ValueError, KeyError):
        value = -1.0
    if not value >= 1:  # also refuses NaN
        raise error(f"{what} {text!r} must be a positive number with an optional unit (B, KB, "
                    f"MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 2GB or 80GiB")
    return int(value)
