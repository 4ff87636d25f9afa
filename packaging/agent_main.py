"""Entry point that Nuitka compiles into the `edge-agent` binary (see build_binary.sh).

A file outside the `edge_agent` package on purpose: compiling `edge_agent/__main__.py` would put
the package's own directory on the compile-time import path, where its module names could shadow
top-level ones. This file only hands over to the same `main()` the `edge-agent` script uses.
"""

import sys

from edge_agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
