"""The handshake's state table: (role, state, input) -> (action, next state).

The rows are those of schema/handshake.yaml (state_machine), generated into resonant.handshake;
resonant.session.Session classifies what it receives into one Input and runs the row's Action.
"""

from __future__ import annotations

import enum

from resonant import handshake

__all__ = ["Role", "State", "Input", "Action", "TRANSITIONS"]


# str Enums with str's own equality and hash (cached in the string, so the per-frame table lookup
# costs what identity hashing did): Role.CLIENT == "client", and either finds the other in a dict.


class Role(str, enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(str, enum.Enum):
    IDLE = "idle"                    # client: not started; server: waiting for a ping
    AWAIT_CAPABILITY = "await_capability"  # client: ping sent
    ESTABLISHED = "established"
    FAILED = "failed"                # client: the handshake was refused or timed out
    CLOSED = "closed"


class Input(str, enum.Enum):
    START = "start"                  # local: initiate()
    PING_OK = "ping_ok"              # a ping this side can serve
    PING_BAD = "ping_bad"            # a ping it cannot (version, space, required encryption)
    CAPABILITY_OK = "capability_ok"  # a capability this side can use
    CAPABILITY_BAD = "capability_bad"
    ERROR = "error"                  # an error document
    DATA = "data"                    # a data frame or a V-Stream frame
    BAD_FRAME = "bad_frame"          # bytes that are not a frame, or a control document off its schema
    RETRY = "retry"                  # tick(): the ping is due again
    DEADLINE = "deadline"            # tick(): the handshake ran out of attempts
    CLOSE = "close"                  # local: close()
    SILENCE = "silence"              # tick(): no answer within the reference fallback's wait (client, when allowed)


class Action(str, enum.Enum):
    SEND_PING = "send_ping"
    ANSWER_CAPABILITY = "answer_capability"
    ANSWER_ERROR = "answer_error"
    REFUSE_PING = "refuse_ping"      # a server in established: a rate-limited error, the session stays
    ADOPT = "adopt"                  # take the capability's agreement
    ADOPT_IF_REFERENCE = "adopt_if_reference"  # established: adopt a late capability in reference mode, else ignore
    ASSUME_REFERENCE = "assume_reference"  # no answer: take the peer for a reference receiver (reference mode)
    FAIL = "fail"                    # report HandshakeFailed
    ACCEPT = "accept"                # deliver the data
    ACCEPT_IF_LENIENT = "accept_if_lenient"  # deliver, or refuse with HANDSHAKE_REQUIRED in strict mode
    REPORT_REMOTE_ERROR = "report_remote_error"
    REPORT_BAD_FRAME = "report_bad_frame"
    IGNORE = "ignore"
    DROP = "drop"                    # closed: count and drop
    SHUTDOWN = "shutdown"
    INVALID = "invalid"              # local misuse: LocalProtocolError, nothing changes


def _table() -> dict[tuple[Role, State, Input], tuple[Action, State]]:
    """The table of schema/handshake.yaml (state_machine), generated into resonant.handshake."""
    for enum_cls, names in ((Role, handshake.SM_ROLES), (State, handshake.SM_STATES), (Input, handshake.SM_INPUTS),
                            (Action, handshake.SM_ACTIONS)):
        if sorted(m.value for m in enum_cls) != sorted(names):  # pragma: no cover - caught by the tests
            raise ImportError(f"resonant.session.{enum_cls.__name__} does not match the schema's state machine "
                              f"({sorted(names)}); run make codegen and update transitions.py")
    return {(Role(r), State(st), Input(i)): (Action(a), State(n))
            for (r, st, i), (a, n) in handshake.SM_TRANSITIONS.items()}


#: (role, state, input) -> (action, next state). Every reachable pair is listed.
TRANSITIONS: dict[tuple[Role, State, Input], tuple[Action, State]] = _table()
ACTION_METHOD = {a: "_do_" + a.value for a in Action}  # the Session method that carries out each action
