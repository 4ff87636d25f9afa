"""The warm pool's tuning: when to scale, when a crash loop is declared, how replacements back off.

Numbers only, kept apart from `runtimes.pool` (the mechanism) so they read on one page.
"""

# Scale up when in-flight requests exceed this share of the ready slots: starting a worker
# takes 1-70 ms, so we start one before the pool is completely full.
TARGET_UTILISATION = 0.8
# Crash-loop detection: this many unexpected exits inside the window marks the function
# unhealthy. Five in thirty seconds is far past any transient fault (Kubernetes' CrashLoopBackOff
# uses a similar order of magnitude).
CRASH_LOOP_COUNT = 5
CRASH_LOOP_WINDOW_S = 30.0
# Replacement backoff: 0.1 s doubling to 10 s, reset after a worker served for a while.
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 10.0
# Scale on CPU too: a worker busier than this (percent of one core, sampled by the sandbox) is
# saturated even when it has free concurrency slots, e.g. a CPU-bound Node function.
CPU_SCALE_PERCENT = 85.0
# On close, how long to let workers that are still starting finish starting (then they stop).
START_WAIT_ON_CLOSE_S = 10.0
# How often idle workers are looked for; the idle timeout itself comes from the manifest.
REAP_INTERVAL_S = 1.0
