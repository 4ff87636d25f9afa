"""The rollout core: pure values and decisions shared by the platform and the agent. No I/O.

Read in this order:

1. `spec` -- `RolloutSpec.from_dict(...)`: function@version, target, waves, rate, bake, timeouts,
   gates, failure policy; every bad field reported at once (`errors.SpecError`).
2. `selector` -- `parse_selector("group=west,arch=aarch64,memory_mb>=1024")` and `DeviceFacts`
   (a device's labels, reported profile, runtimes, installed versions).
3. `eligibility` -- which target devices cannot take the bundle (`wrong_arch`, `no_runtime`,
   `insufficient_memory`, `disk_full`), for `--dry-run` and planning.
4. `waves` -- deterministic wave assignment from a stable hash of (rollout id, device id).
5. `metrics` and `gates` -- per-version metrics and the gate language with pass / fail /
   inconclusive verdicts.
6. `states` -- the named rollout and device states and their allowed transitions, as data.
7. `controller` -- `step(rollout, event) -> (rollout, actions)`: the decision function the
   platform's controller drives (it persists the rollout and carries out the actions).
8. `messages` -- the platform <-> device contract: the desired document's per-function rollout
   entry and the device's status reports (seq-ordered, idempotent).
9. `model` -- the stored `Rollout`, `plan()` (the `--dry-run` answer), `new_rollout()`, and
   `admit()` (one active rollout per function, `--supersede`); `render` -- the `--watch` view.

docs/rollouts.md describes the whole design and what is built.
"""
