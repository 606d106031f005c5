"""resonant.transitions: the handshake state table and its enums (the Session's conformance to
every row is in test_session.py)."""

from __future__ import annotations

from resonant.transitions import TRANSITIONS, Action, Input, Role, State


def test_table_is_complete_for_reachable_states():
    reachable = {Role.SERVER: {State.IDLE, State.ESTABLISHED, State.CLOSED},
                 Role.CLIENT: {State.IDLE, State.AWAIT_CAPABILITY, State.ESTABLISHED, State.FAILED, State.CLOSED}}
    for role, states in reachable.items():
        for state in states:
            for inp in Input:
                action, nxt = TRANSITIONS[role, state, inp]
                assert isinstance(action, Action) and isinstance(nxt, State)
                assert nxt in reachable[role], (role, state, inp, nxt)


def test_the_enums_hash_and_compare_as_their_strings():
    """Role/State/Input/Action are str Enums with str's hash: a member and its value are the
    same dict key, both ways (they used to hash by identity, so {"client": 1}.get(Role.CLIENT)
    was None although Role.CLIENT == "client")."""
    assert {"client": 1}.get(Role.CLIENT) == 1
    for enum_cls in (Role, State, Input, Action):
        for m in enum_cls:
            assert m == m.value and hash(m) == hash(m.value)
            assert {m.value: 1}.get(m) == 1 and {m: 1}.get(m.value) == 1
    row = next(iter(TRANSITIONS))
    assert TRANSITIONS[tuple(x.value for x in row)] is TRANSITIONS[row]  # the table answers to plain strings too
