"""User-facing errors: one clear sentence, exit status 2, no traceback; the one redaction of
credentials written into URLs; text made safe to print."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from typing import TypeVar

from saesweep.interrupt import exit_status

T = TypeVar("T")

EXIT_USER_ERROR = 2


URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@")
"""The user name and password part of a URL (scheme://USER:PASS@host)."""
HTTP_AFTER_HOST = re.compile(
    r"(\bhttps?://[^/\s?#'\"]+)([/?#][^\s'\"]*?)(?=[;:,.)]*(?:[\s'\"]|$))", re.IGNORECASE
)
"""What follows the host of an http(s) URL: the path, query and fragment of an endpoint,
where a proxy's token or a signature may sit."""


def redact(text: str) -> str:
    """`text` with every URL's user name and password shown as *** (scheme://***@host/...),
    and whatever follows the host of an http(s) URL (an endpoint's path, query or fragment)
    as /*** (s3:// store URIs keep their bucket and prefix: they name what to fix)."""
    text = URL_USERINFO.sub(r"\1***@", text)
    return HTTP_AFTER_HOST.sub(lambda m: m.group(1) + ("/***" if m.group(2) != "/" else "/"), text)


def printable(text: object, keep: str = "") -> str:
    """`text` with every unprintable character (terminal escapes among them) except those in
    `keep` written as a Python escape, so printing it cannot rewrite the terminal."""
    return "".join(
        c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii")
        for c in str(text)
    )


class UserError(Exception):
    """A failure the user can fix; its message names what to fix. Shown (str, tracebacks,
    logs) with credentials in URLs redacted."""

    def __str__(self) -> str:
        return redact(super().__str__())


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point so a UserError prints one line and exits with status 2, and a
    SIGINT or SIGTERM that reaches it exits without a traceback (status 130 or 143)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt as stop:
            raise SystemExit(exit_status(stop)) from None

    return wrapped
