"""The registry's TUF image repository (The Update Framework, the base of Uptane's image repo).

`keys` holds and loads the Ed25519 keys (offline: root, targets; online: snapshot, timestamp),
`store` the metadata files on disk and the repository lock, `claim` the publisher's signature
over its delegated role (built the same way by the publish client and the registry),
`repository` the online operations (publish, timestamp re-signing), `admin` the offline ones
(init, rotate-root, add/revoke publisher), `routes` the `/v1/tuf/` HTTP layout and `cli` the
`edge-cloud tuf` commands. docs/update-security.md is the reference.
"""
