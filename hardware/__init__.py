"""What this box is and what it may spend.

`arch` is the one table of architecture names (canonical, aliases, artifact keys, Go and C++
toolchain names) everything else reads; `profile` detects the device (arch, libc, board, CPUs,
memory, disk) for reporting and artifact choice; `budget` caps the memory and number of workers
all pools share; `limits` wraps worker commands with rlimits, a parent-death signal, an
unprivileged user and (as root) a PID namespace; `cgroup` (v2) and `cgroup_v1` put each worker in
its own group where the kernel allows it, and `isolation` picks between them and says how each
limit is enforced; `leftovers` ends workers a crashed run left; `usage` samples what workers use.
Imports nothing from the rest of edgefn (see docs/hardware.md).
"""
