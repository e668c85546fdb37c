"""What both S3 clients share (store.s3 over boto3, store.s3_async's range reader): the
session and signing region, whether requests are signed or anonymous (`Access`), retry
backoff, and the meaning of S3's error replies."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import boto3
from botocore.credentials import Credentials
from botocore.exceptions import ProfileNotFound

from saesweep.errors import UserError

CREDENTIAL_HINT = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "403",
    "Forbidden",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
}
MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
THROTTLE_CODES = {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException"}


def region_for(session: boto3.session.Session) -> str:
    """The signing region: AWS_REGION, else the session's region, else us-east-1."""
    return os.environ.get("AWS_REGION") or session.region_name or "us-east-1"


def boto_session() -> boto3.session.Session:
    """A boto3 session (credentials, if any, and region), or a UserError for a bad AWS_PROFILE.
    Missing credentials are no error here: see `access_for`."""
    try:
        session = boto3.session.Session()
    except ProfileNotFound as err:
        raise UserError(
            f"AWS profile {err.kwargs.get('profile')!r} (AWS_PROFILE) is not "
            f"configured; fix AWS_PROFILE or {CREDENTIAL_HINT}"
        ) from err
    return session


@dataclass(frozen=True)
class Access:
    """How a store's S3 requests are authorized: signed with `credentials`, or unsigned
    (anonymous: what a public bucket allows everyone) when `credentials` is None, either because
    the user asked for it (`forced`, --anonymous) or because no credentials are configured."""

    credentials: Credentials | None
    forced: bool = False

    @property
    def signed(self) -> bool:
        return self.credentials is not None

    def _why_unsigned(self) -> str:
        if self.forced:
            return "anonymous access was asked for (--anonymous, --train-data.anonymous)"
        return "no S3 credentials are configured"

    def require_write(self, uri: str) -> None:
        """A UserError unless requests are signed: writes always need credentials."""
        if not self.signed:
            raise UserError(
                f"writing to {uri} needs S3 credentials, but {self._why_unsigned()} (without "
                f"them only public buckets can be read); {CREDENTIAL_HINT}"
                + (" and drop the anonymous option" if self.forced else "")
            )

    def refused(self, endpoint: str, uri: str, code: str) -> UserError:
        """The UserError for S3 refusing a request for `uri` (HTTP 403, a credential code)."""
        if self.signed:
            return UserError(
                f"S3 at {endpoint} rejected the credentials for {uri} ({code}); check "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE and their permissions "
                "on the bucket"
            )
        fix = "drop the anonymous option and " if self.forced else ""
        return UserError(
            f"S3 at {endpoint} refused an anonymous (unsigned) request for {uri} ({code}), "
            f"sent because {self._why_unsigned()}: the bucket is not public; to read it, "
            f"{fix}{CREDENTIAL_HINT}"
        )


def access_for(session: boto3.session.Session, anonymous: bool = False) -> Access:
    """Requests unsigned when `anonymous` or when `session` finds no credentials (reads of public
    buckets work without any), else signed with the session's credentials."""
    if anonymous:
        return Access(None, forced=True)
    return Access(session.get_credentials())


def backoff_s(attempt: int, base: float = 0.25, cap: float = 8.0) -> float:
    """Exponential backoff (half fixed, half jitter) before retry number `attempt` (0-based)."""
    delay = min(cap, base * 2**attempt)
    return delay / 2 + random.uniform(0, delay / 2)


def is_transient_reply(status: int, code: str) -> bool:
    """Whether an S3 error reply is worth retrying: 5xx, 429 or a throttling code."""
    return status >= 500 or status == 429 or code in THROTTLE_CODES


def reply_error(
    status: int, code: str, uri: str, endpoint: str, access: Access
) -> Exception | None:
    """FileNotFoundError or a UserError for S3's error reply (HTTP `status`, error `code`) to a
    request for the object or bucket at `uri` sent with `access`, or None when the reply means
    none of those."""
    bucket = uri.removeprefix("s3://").partition("/")[0]
    if code == "NoSuchBucket":
        return UserError(
            f"bucket {bucket!r} does not exist at {endpoint}; create it or fix the store URI"
        )
    if code in MISSING_KEY_CODES or status == 404:
        return FileNotFoundError(f"{uri} does not exist")
    if code in CREDENTIAL_CODES or status == 403:
        return access.refused(endpoint, uri, code)
    return None
