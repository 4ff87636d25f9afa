"""The rollout store's caches change nothing but the cost: the stored text is what
`json.dumps(rollout.to_dict())` gives, and another writer's change is always read back.

Real SQLite files; two `RolloutStore`s on one file stand for two replicas.
"""

from __future__ import annotations

import json
from pathlib import Path

from cloud_sync.platform.rollout_store import RolloutStore
from cloud_sync.rollout.controller import Pause, Reports, Start, step
from cloud_sync.rollout.model import Rollout
from tests.test_rollout_controller import D, Fleet, make


def _plain(r: Rollout) -> str:
    return json.dumps(r.to_dict(), separators=(",", ":"))


def _stored(path: Path, rollout_id: str) -> str:
    fresh = RolloutStore(path)  # no cache: what is on disk
    try:
        got = fresh.get(rollout_id)
        assert got is not None
        return _plain(got)
    finally:
        fresh.close()


def test_saved_text_is_the_plain_encoding_through_many_changes(tmp_path: Path) -> None:
    store = RolloutStore(tmp_path / "r.db")
    f = Fleet()
    try:
        r, actions = step(make(300, waves="10,50,100", bake_s=0), Start(0.0))
        store.save(r)
        for n, state in enumerate((D.DOWNLOADING, D.INSTALLING, D.ACTIVE, D.HEALTHY)):
            devices = [a.device for a in actions]
            r, more = step(r, Reports(n + 1.0, tuple(f.report(d, state) for d in devices[::2])))
            actions = [*actions, *more]
            assert store.encode(r) == _plain(r)
            store.save(r)
            assert _stored(tmp_path / "r.db", r.id) == _plain(r)
        assert store.get(r.id) == r
        assert Rollout.from_dict(json.loads(store.encode(r))) == r
    finally:
        store.close()


def test_a_change_by_another_writer_is_read_not_the_cached_value(tmp_path: Path) -> None:
    a, b = RolloutStore(tmp_path / "r.db"), RolloutStore(tmp_path / "r.db")
    try:
        r, _ = step(make(50), Start(0.0))
        a.save(r)
        assert [x.id for x in a.active()] == [r.id]
        assert b.get(r.id) == r
        paused, _ = step(r, Pause(1.0))  # an operator's pause, on the other replica
        b.save(paused)
        again = a.active()
        assert again == [paused] and again[0].state is not r.state
        # Unchanged text: the decoded value is reused, not decoded again.
        assert a.active()[0] is again[0]
    finally:
        a.close()
        b.close()
