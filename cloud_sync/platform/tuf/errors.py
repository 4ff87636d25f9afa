"""The TUF repository's errors: each a stable code and the HTTP status the registry answers."""

from __future__ import annotations

from cloud_sync.errors import CloudSyncError


class TufError(CloudSyncError):
    """Something about the TUF repository went wrong; `status` is the HTTP answer."""

    code = "tuf_error"
    category = "config"
    status = 500


class NotInitialised(TufError):
    """`edge-cloud tuf init` has not been run on this data dir."""

    code = "tuf_not_initialised"
    status = 404


class AlreadyInitialised(TufError):
    code = "tuf_already_initialised"
    status = 409


class KeyMissing(TufError):
    """A key file the operation needs is not where it should be (offline keys moved away)."""

    code = "tuf_key_missing"
    status = 500


class PublishRefused(TufError):
    """A publish the TUF delegations do not allow (unknown publisher, foreign function, bad
    signature): 403 unless a subclass says otherwise."""

    code = "tuf_publish_refused"
    status = 403


class RoleConflict(PublishRefused):
    """The signed role is not the next version of the current one (a racing publish won)."""

    code = "tuf_role_conflict"
    status = 409


class BadClaim(PublishRefused):
    """The publish request's TUF headers are missing or malformed."""

    code = "tuf_bad_claim"
    status = 400
