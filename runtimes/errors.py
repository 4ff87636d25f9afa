"""One error tree for everything under `runtimes`.

Each error carries a stable `code` (what clients and the cloud see) and the HTTP status the local
API answers with, so the API layer maps errors without knowing every subclass.
"""

from __future__ import annotations


class RuntimeErrorBase(Exception):
    code = "internal"
    status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class ManifestError(RuntimeErrorBase):
    """A manifest is malformed or incomplete: the function is not loaded."""

    code = "bad_manifest"
    status = 422


class ToolchainError(RuntimeErrorBase):
    """A compiler or runtime executable the function needs is not installed."""

    code = "missing_toolchain"
    status = 503


class FunctionError(RuntimeErrorBase):
    """The function ran and reported a failure (threw, returned an error, panicked)."""

    code = "function_error"
    status = 500


class WorkerCrashed(RuntimeErrorBase):
    """The worker died or broke the protocol while this request was in flight."""

    code = "worker_crashed"
    status = 502


class InvocationTimeout(RuntimeErrorBase):
    code = "timeout"
    status = 504


class Overloaded(RuntimeErrorBase):
    """The wait queue is full: the client should back off and retry."""

    code = "overloaded"
    status = 429


class Unavailable(RuntimeErrorBase):
    """The function cannot run now (crash loop, shutting down, failed to start)."""

    code = "unavailable"
    status = 503


class BundleError(RuntimeErrorBase):
    """A bundle was refused: bad signature, digest mismatch, unsafe archive, wrong arch..."""

    code = "bad_bundle"
    status = 422


class BuildError(RuntimeErrorBase):
    code = "build_failed"
    status = 422


class RequestRejected(RuntimeErrorBase):
    """The function's host could not decode the request (malformed JSON to a JSON function):
    the caller's mistake, so 400 and never retried elsewhere (`bad_request` on the wire)."""

    code = "bad_request"
    status = 400
