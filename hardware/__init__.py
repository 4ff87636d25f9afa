"""What this box is and what it may spend.

`arch` is the one table of architecture names (canonical, aliases, artifact keys, Go and C++
toolchain names) everything else reads; `profile` detects the device (arch, libc, board, CPUs,
memory, disk) for reporting and artifact choice; `budget` caps the memory and number of workers
all pools share; `limits` wraps worker commands with rlimits, a parent-death signal and an
unprivileged user; `cgroup` puts each worker in a cgroup v2 group where the kernel allows it;
`usage` samples what workers use. Imports nothing from the rest of edgefn (see docs/hardware.md).
"""
