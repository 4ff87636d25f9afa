"""`edge-cloud fn new`: a working function to start from, in C++, Go or Node.

Every template's handler returns its input unchanged, byte for byte, so a newcomer can build,
install and invoke it at once and see exactly what they sent; each comes with a small test that
`edge-cloud fn test DIR` runs with the real toolchain (Node: `node --test`; Go: `go test`;
C++: a test main compiled against the function's sources).

`scaffold(name, runtime, directory)` writes the files into a new (or empty) directory and never
overwrites anything. Templates are plain strings with `{name}` filled in (and, for Go, the path
of the SDK shipped with this package, so `go test` works offline).
"""

from __future__ import annotations

from pathlib import Path

from runtimes.errors import ManifestError
from runtimes.manifest import NAME_RE, RUNTIMES

_MANIFEST_HEAD = """\
# {name}: returns its input unchanged. Reference: docs/bundle-format.md (the [function] table).
name = "{name}"
version = "0.1.0"
runtime = "{runtime}"
entry = "{entry}"
timeout_ms = 5000
"""

_POOL = """
[pool]
min_instances = 1   # warm before the first request
max_instances = 4
concurrency = {concurrency}
"""

_NODE_HANDLER = """\
// {name}: returns its input unchanged, byte for byte.
//
// `event` is a Buffer holding the raw request body. (When the request says Content-Type
// application/json the agent parses it first and `event` is the parsed value; returning it
// answers the same JSON value.) Returning a Buffer sends those exact bytes back.
'use strict';

exports.handler = async (event, context) => {{
  context.log(`{name}: ${{Buffer.isBuffer(event) ? event.length + ' bytes' : 'a JSON value'}}`);
  return event;
}};
"""

_NODE_TEST = """\
// Run with `edge-cloud fn test .` (or `node --test`).
'use strict';
const test = require('node:test');
const assert = require('node:assert');
const {{ handler }} = require('./handler.js');

const context = {{ log: () => {{}} }};

test('returns its input unchanged, byte for byte', async () => {{
  const input = Buffer.from([0x00, 0x01, 0xfe, 0xff, 0x7b, 0x0a]);
  const output = await handler(input, context);
  assert.ok(Buffer.isBuffer(output));
  assert.deepStrictEqual(output, input);
}});
"""

_NODE_PACKAGE = """\
{{
  "name": "{name}",
  "version": "0.1.0",
  "private": true,
  "description": "edgefn function {name}",
  "scripts": {{
    "test": "node --test"
  }},
  "dependencies": {{}}
}}
"""

_GO_MOD = """\
module example.com/{name}

go 1.21

require edgefn.dev/sdk v0.0.0

// The Go SDK shipped with edgefn, so `go test` works offline. `edge-cloud fn build` and
// `edge-cloud fn test` point this at the SDK of the edgefn that runs them.
replace edgefn.dev/sdk => {sdk}
"""

_GO_MAIN = """\
// {name}: returns its input unchanged, byte for byte.
package main

import (
\t"context"

\tedgefn "edgefn.dev/sdk"
)

func main() {{ edgefn.Start(handle) }}

func handle(ctx context.Context, req *edgefn.Request) ([]byte, error) {{
\tedgefn.Logf(ctx, edgefn.LevelDebug, "{name}: %d bytes", len(req.Payload))
\tif req.ContentType != "" {{
\t\treq.SetContentType(req.ContentType) // answer with the type we were sent
\t}}
\treturn req.Payload, nil
}}
"""

_GO_TEST = """\
package main

import (
\t"bytes"
\t"context"
\t"testing"

\tedgefn "edgefn.dev/sdk"
)

func TestHandleReturnsInputUnchanged(t *testing.T) {{
\tin := []byte{{0x00, 0x01, 0xfe, 0xff, '{{', '\\n'}}
\tout, err := handle(context.Background(), &edgefn.Request{{Payload: in}})
\tif err != nil {{
\t\tt.Fatal(err)
\t}}
\tif !bytes.Equal(out, in) {{
\t\tt.Fatalf("got %v, want %v", out, in)
\t}}
}}
"""

_CPP_SOURCE = """\
// {name}: returns its input unchanged, byte for byte.
//
// The same source builds the isolated worker (<entry>) and the in-process library
// (<entry>.so); see docs/runtime-cpp.md. Link extra libraries with [build] libs in edgefn.toml.
#include <edgefn.hpp>

#include <string>
#include <string_view>

std::string handle(std::string_view request) {{ return std::string(request); }}

EDGEFN_FUNCTION(handle)
"""

_CPP_TEST = """\
// Compiled with the function's sources and run by `edge-cloud fn test .`.
#include <cstdio>
#include <string>
#include <string_view>

std::string handle(std::string_view request);

int main() {{
    const std::string input("\\x00\\x01\\xfe\\xff{{\\n", 6);
    const std::string output = handle(input);
    if (output != input) {{
        std::fprintf(stderr, "FAIL: {name} changed its input\\n");
        return 1;
    }}
    std::printf("ok: {name} returns its input unchanged (%zu bytes)\\n", input.size());
    return 0;
}}
"""


def go_sdk_dir() -> Path:
    from runtimes.gobuild import SDK_DIR

    return SDK_DIR.resolve()


def templates(name: str, runtime: str) -> dict[str, str]:
    """Relative path -> file text for a new function."""
    if runtime == "node":
        manifest = _MANIFEST_HEAD.format(name=name, runtime="node", entry="handler.js")
        return {
            "edgefn.toml": manifest + _POOL.format(concurrency=16),
            "handler.js": _NODE_HANDLER.format(name=name),
            "handler.test.js": _NODE_TEST.format(name=name),
            "package.json": _NODE_PACKAGE.format(name=name),
        }
    if runtime == "go":
        manifest = _MANIFEST_HEAD.format(name=name, runtime="go", entry=name)
        return {
            "edgefn.toml": manifest + _POOL.format(concurrency=32),
            "go.mod": _GO_MOD.format(name=name, sdk=go_sdk_dir()),
            "main.go": _GO_MAIN.format(name=name),
            "main_test.go": _GO_TEST.format(name=name),
            ".gitignore": f"/{name}\n*.efb\n",
        }
    if runtime == "cpp":
        manifest = _MANIFEST_HEAD.format(name=name, runtime="cpp", entry=name)
        manifest += (
            'isolation = "process"   # or "in-process": faster, but a crash hits the agent\n'
        )
        manifest += _POOL.format(concurrency=4)
        manifest += '\n[build]\nlibs = []            # e.g. ["z"] links -lz\n'
        return {
            "edgefn.toml": manifest,
            f"{name}.cpp": _CPP_SOURCE.format(name=name),
            "test/echo_test.cpp": _CPP_TEST.format(name=name),
            ".gitignore": f"/{name}\n/{name}.so\n*.efb\n",
        }
    raise ManifestError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")


def scaffold(name: str, runtime: str, directory: Path) -> list[Path]:
    """Write a new function into `directory` (created; must be absent or empty)."""
    if not NAME_RE.match(name):
        raise ManifestError(
            f"function name {name!r} must match {NAME_RE.pattern} "
            "(lowercase letters, digits, '-' and '_')"
        )
    files = templates(name, runtime)
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ManifestError(f"{directory} already exists and is not empty; choose another --dir")
    written = []
    for rel, text in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
        written.append(path)
    return written
