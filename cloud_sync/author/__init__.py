"""The function author's toolchain: `edge-cloud keys` and `edge-cloud fn ...`.

Apart from the operator commands (`cloud_sync.platform.cli`), which only hook `cli.register`
into their parser. The flow an author follows, one module per step:

    keys      create a publisher's signing key
    new       scaffold a function (templates in `scaffold`)
    testing   run its tests with the real toolchain (Node deps installed, Go replaces resolved)
    build     compile per arch (`arches` picks them from `hardware.arch`), stage Node with
              `runtimes.nodebuild`, then `runtimes.bundle.build_bundle` packs and signs,
              reproducibly (`runtimes.sources`)
    sign      re-sign or add a signature (`runtimes.bundle.rewrite_signatures`)
    publish   upload to the platform's registry (same bytes again: a no-op)

The builders themselves (Go, C++, Node) live in `runtimes`, beside the bundle format, so the
platform's cloud execution and the tests build exactly as the author does.
"""
