"""The `runtimes` subtree of the one error tree (`hardware.errors.EdgefnError`).

Each error carries a stable `code` (what clients and the cloud see), a `category`, and the HTTP
status the local API answers with, so the API layer maps errors without knowing every subclass.
"""

from __future__ import annotations

from hardware.errors import Category, EdgefnError


class RuntimeErrorBase(EdgefnError):
    """The root of the `runtimes` subtree: anything about running functions."""

    code = "internal"
    category: Category = "internal"
    status = 500


class ManifestError(RuntimeErrorBase):
    """A manifest is malformed or incomplete: the function is not loaded."""

    code = "bad_manifest"
    category = "config"
    status = 422


class ToolchainError(RuntimeErrorBase):
    """A compiler or runtime executable the function needs is not installed."""

    code = "missing_toolchain"
    category = "config"
    status = 503


class FunctionError(RuntimeErrorBase):
    """The function ran and reported a failure (threw, returned an error, panicked)."""

    code = "function_error"
    category = "function"
    status = 500


class WorkerCrashed(RuntimeErrorBase):
    """The worker died or broke the protocol while this request was in flight."""

    code = "worker_crashed"
    category = "function"
    status = 502


class InvocationTimeout(RuntimeErrorBase):
    """The invocation did not answer within its deadline."""

    code = "timeout"
    category = "function"
    status = 504


class Overloaded(RuntimeErrorBase):
    """The wait queue is full: the client should back off and retry."""

    code = "overloaded"
    category = "resource"
    status = 429


class Unavailable(RuntimeErrorBase):
    """The function cannot run now (crash loop, shutting down, failed to start)."""

    code = "unavailable"
    category: Category = "resource"  # annotated: cloud_sync.errors.CloudUnavailable overrides it
    status = 503


class BundleError(RuntimeErrorBase):
    """A bundle was refused: bad signature, digest mismatch, unsafe archive, wrong arch..."""

    code = "bad_bundle"
    category = "config"
    status = 422


class BuildError(RuntimeErrorBase):
    """Building a function's artifacts failed (compiler error, bad sources)."""

    code = "build_failed"
    category = "config"
    status = 422


class RequestRejected(RuntimeErrorBase):
    """The function's host could not decode the request (malformed JSON to a JSON function):
    the caller's mistake, so 400 and never retried elsewhere (`bad_request` on the wire)."""

    code = "bad_request"
    category = "request"
    status = 400
