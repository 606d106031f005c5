"""resonant.replay: the ReplayWindow against a model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from resonant.replay import ReplayWindow


def test_replay_window_semantics():
    w = ReplayWindow(size=64)
    assert w.check(1, 100) == "ok"
    assert w.check(1, 100) == "replay"
    assert w.check(1, 90) == "ok" and w.check(1, 90) == "replay"
    assert w.check(1, 36) == "too_old"  # 100 - 36 = 64: outside a 64-wide window
    assert w.check(1, 37) == "ok"
    assert w.check(1, 1000) == "ok"
    assert w.check(1, 999) == "ok" and w.check(1, 937) == "ok" and w.check(1, 936) == "too_old"
    assert w.check(2, 0) == "ok"  # streams are independent


@given(st.lists(st.integers(0, 300), max_size=200), st.integers(1, 128))
def test_replay_window_matches_a_model(seqs, size):
    w = ReplayWindow(size=size)
    seen: set[int] = set()
    top = None
    for q in seqs:
        if top is not None and q <= top - size:
            want = "too_old"
        elif q in seen:
            want = "replay"
        else:
            want = "ok"
        assert w.check(0, q) == want
        if want == "ok":
            seen.add(q)
            top = q if top is None else max(top, q)


def test_replay_window_bounded_streams():
    w = ReplayWindow(size=8, max_streams=10)
    for sid in range(1000):
        w.check(sid, 0)
    assert len(w) == 10
