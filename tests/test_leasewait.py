"""The node's lease wait (p2preg/node/leasewait.py): the rule table, and the machine over a clock.

No trio, no tracker: replies are built by hand, time is a number the test moves.
"""

from __future__ import annotations

import pytest

from p2preg.core.wire import LeaseReply, LeaseStatus
from p2preg.node.leasewait import (
    BOUND_FLOOR_S,
    LONG_POLL_S,
    PACE_MAX_S,
    PACE_MIN_S,
    RULES,
    TAKEOVER_PACE_S,
    TAKEOVER_WAIT_S,
    Ask,
    AskAgain,
    Blob,
    Due,
    FallBack,
    FetchAsHolder,
    JoinSwarm,
    LeaseWait,
    Replied,
    Situation,
    TrackerFailed,
    WaitState,
    decide,
)

MAX_S = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_reply(holder: str | None = "a", done: int = 0, retry_after_s: float = 0.5) -> Replied:
    return Replied(LeaseReply(LeaseStatus.WAIT, holder=holder, bytes_done=done,
                              retry_after_s=retry_after_s))


def situation(event: Replied | Due | TrackerFailed, *, now: float = 0.0, deadline: float = 60.0,
              asked_at: float = 0.0, wait_s: float = LONG_POLL_S,
              bound: float = float("inf"), standby_since: float | None = None) -> Situation:
    state = WaitState(started_at=0.0, deadline=deadline, asked_at=asked_at, wait_s=wait_s,
                      bound=bound, standby_since=standby_since)
    return Situation(event, state, now, MAX_S)


# -- the table, row by row ---------------------------------------------------------

CASES = [
    (situation(TrackerFailed("too many", "lease_cap")),
     "a lease refused at this node's cap: fall back",
     FallBack("lease_cap", "the tracker refused a lease: this node holds its cap")),
    (situation(TrackerFailed("down")), "a tracker that fails: fall back",
     FallBack("tracker", "tracker: down")),
    (situation(TrackerFailed("stands by", "standing_by"), now=5.0, standby_since=1.0),
     "replicas standing by while another takes over: ask again, for a while",
     AskAgain(TAKEOVER_PACE_S)),
    (situation(TrackerFailed("stands by", "standing_by"), now=1.0 + TAKEOVER_WAIT_S,
               standby_since=1.0),
     "a tracker that fails: fall back", FallBack("tracker", "tracker: stands by")),
    (situation(Due(), now=50.0, bound=50.0),
     "past the absolute bound of the fetch waited for: fall back",
     FallBack("lease_bound", "the upstream fetch waited for passed its bound")),
    (situation(Due(), now=55.0, bound=57.0), "due: ask, long-polling at most until the deadline",
     Ask(2.0)),
    (situation(Due(), now=60.0), "lease_wait_max_s without progress: fall back",
     FallBack("lease_wait", "the upstream fetch waited for made no progress")),
    (situation(Due(), now=1.0), "due: ask, long-polling at most until the deadline",
     Ask(LONG_POLL_S)),
    (situation(Due(), now=57.0), "due: ask, long-polling at most until the deadline", Ask(3.0)),
    (situation(Replied(LeaseReply(LeaseStatus.SEEDED))), "seeded without metainfo: fall back",
     FallBack("bad_metainfo", "tracker said SEEDED without metainfo")),
    (situation(Replied(LeaseReply(LeaseStatus.SEEDED, metainfo=b"d4:infoe"))),
     "seeded: join the swarm", JoinSwarm(b"d4:infoe")),
    (situation(Replied(LeaseReply(LeaseStatus.GRANTED, ttl_s=30.0))),
     "granted without a lease id: fall back",
     FallBack("tracker", "tracker granted a lease without naming it")),
    (situation(Replied(LeaseReply(LeaseStatus.GRANTED, lease_id="L1", ttl_s=30.0))),
     "granted: fetch from upstream as the holder", FetchAsHolder("L1", 30.0)),
    (situation(Replied(LeaseReply(LeaseStatus.VERIFY, lease_id="L2", ttl_s=30.0))),
     "verify: fetch from upstream as the holder, to settle a dispute",
     FetchAsHolder("L2", 30.0, verify=True)),
    (situation(Replied(LeaseReply(LeaseStatus.VERIFY, ttl_s=30.0))),
     "verify: fetch from upstream as the holder, to settle a dispute",
     FallBack("tracker", "tracker asked to verify without naming the lease")),
    (situation(wait_reply(), now=9.0, asked_at=1.0), "wait, held by the tracker: ask again at once",
     AskAgain(0.0)),
    (situation(wait_reply(retry_after_s=0.5), now=1.1, asked_at=1.0),
     "wait, answered early: ask again after retry_after_s", AskAgain(0.5)),
    (situation(wait_reply(retry_after_s=0.0), now=1.1, asked_at=1.0),
     "wait, answered early: ask again after retry_after_s", AskAgain(PACE_MIN_S)),
    (situation(wait_reply(retry_after_s=30.0), now=1.1, asked_at=1.0),
     "wait, answered early: ask again after retry_after_s", AskAgain(PACE_MAX_S)),
    (situation(Replied(LeaseReply("evicted"))),  # type: ignore[arg-type]  # a future status
     "a reply this node does not know: fall back",
     FallBack("tracker", "tracker replied 'evicted'")),
]


@pytest.mark.parametrize(("s", "rule", "action"), CASES, ids=[c[1] + f" #{i}" for i, c in
                                                               enumerate(CASES)])
def test_each_rule_gives_its_action(s: Situation, rule: str, action: object) -> None:
    chosen, got = decide(s)
    assert chosen.name == rule
    assert got == action


def test_every_rule_of_the_table_is_exercised_above() -> None:
    assert {rule.name for rule in RULES} == {name for _, name, _ in CASES}


def test_the_table_ends_in_catch_alls_for_every_event() -> None:
    # Whatever arrives, some rule answers it: decide() never runs off the table.
    for event in (Due(), TrackerFailed("x"), wait_reply()):
        assert any(r.applies(situation(event)) for r in RULES)


# -- the machine over time ---------------------------------------------------------


def test_a_holder_that_makes_progress_is_waited_for_past_lease_wait_max_s() -> None:
    clock = Clock()
    wait = LeaseWait(MAX_S, clock)
    assert wait.step(Due()) == Ask(LONG_POLL_S)
    for done in range(1, 20):  # 19 long polls of 10 s: far past MAX_S in all
        clock.now += LONG_POLL_S
        assert wait.step(wait_reply(done=done << 20)) == AskAgain(0.0)
        assert wait.step(Due()) == Ask(LONG_POLL_S)
    assert clock.now - wait.state.started_at > 3 * MAX_S


def test_a_holder_that_stalls_is_given_up_on_after_lease_wait_max_s() -> None:
    clock = Clock()
    wait = LeaseWait(MAX_S, clock)
    wait.step(Due())
    asks = 0
    while True:
        clock.now += LONG_POLL_S
        assert isinstance(wait.step(wait_reply(done=5)), AskAgain)
        action = wait.step(Due())
        if isinstance(action, FallBack):
            break
        asks += 1
    assert action.reason == "lease_wait"
    assert wait.last_rule == "lease_wait_max_s without progress: fall back"
    # The first reply counts as progress (nothing was seen before): 60 s from there.
    assert clock.now == 1000.0 + LONG_POLL_S + MAX_S
    assert asks == 6  # at 1010, 1020, … 1060


def test_the_queue_moving_to_another_holder_resets_the_deadline() -> None:
    clock = Clock()
    wait = LeaseWait(MAX_S, clock)
    wait.step(Due())
    clock.now += 50
    wait.step(wait_reply(holder="a", done=0))
    clock.now += 50
    wait.step(wait_reply(holder="a", done=0))
    assert wait.state.deadline == 1050 + MAX_S
    wait.step(wait_reply(holder="b", done=0))
    assert wait.state.deadline == 1100 + MAX_S
    assert wait.step(Due()) == Ask(LONG_POLL_S)


def test_the_last_ask_long_polls_only_until_the_deadline() -> None:
    clock = Clock()
    wait = LeaseWait(MAX_S, clock)
    clock.now += MAX_S - 2.5
    assert wait.step(Due()) == Ask(2.5)


def test_a_holder_that_dies_leaves_a_lease_this_node_is_then_granted() -> None:
    clock = Clock()
    wait = LeaseWait(MAX_S, clock)
    wait.step(Due())
    clock.now += LONG_POLL_S
    assert wait.step(wait_reply(holder="dead", done=1 << 20)) == AskAgain(0.0)
    wait.step(Due())
    clock.now += 1  # the lease expired: the tracker hands it over
    granted = Replied(LeaseReply(LeaseStatus.GRANTED, lease_id="L2", ttl_s=30.0))
    assert wait.step(granted) == FetchAsHolder("L2", 30.0)


def test_a_tracker_that_fails_mid_wait_ends_it_at_once() -> None:
    clock = Clock()
    wait = LeaseWait(MAX_S, clock)
    wait.step(Due())
    wait.step(wait_reply())
    assert wait.step(TrackerFailed("tracker http://t: ConnectError")) == FallBack(
        "tracker", "tracker: tracker http://t: ConnectError"
    )


def test_a_takeover_is_waited_out_for_a_while_and_no_longer() -> None:
    """Replicas standing by for another (tracker/replica.py): the node asks again
    until one serves, but not past TAKEOVER_WAIT_S; a plain failure still ends it."""
    clock = Clock()
    wait = LeaseWait(MAX_S, clock)
    wait.step(Due())
    standing = TrackerFailed("tracker http://t: stands by", "standing_by")
    assert wait.step(standing) == AskAgain(TAKEOVER_PACE_S)
    clock.now += TAKEOVER_WAIT_S - 1
    assert wait.step(Due()) == Ask(LONG_POLL_S)
    assert wait.step(standing) == AskAgain(TAKEOVER_PACE_S)
    assert wait.step(wait_reply()) == AskAgain(0.5)  # one serves again: the clock restarts
    clock.now += 1
    assert wait.step(standing) == AskAgain(TAKEOVER_PACE_S)
    clock.now += TAKEOVER_WAIT_S
    assert wait.step(standing) == FallBack("tracker", "tracker: tracker http://t: stands by")
    fresh = LeaseWait(MAX_S, clock)
    fresh.step(Due())
    assert fresh.step(TrackerFailed("store away", "unavailable")) == FallBack(
        "tracker", "tracker: store away"
    )


def test_a_rule_added_in_front_takes_precedence() -> None:
    # What a later rule (an absolute bound per blob, say) looks like: one more row.
    from p2preg.node.leasewait import Rule

    bound = Rule("waited 100 s in all: fall back", Due,
                 lambda s: s.now - s.state.started_at >= 100,
                 lambda s: FallBack("lease_wait_total", "waited too long in all"))
    clock = Clock()
    wait = LeaseWait(MAX_S, clock, rules=(bound, *RULES))
    wait.step(Due())
    clock.now += 99
    wait.step(wait_reply(done=1))
    assert isinstance(wait.step(Due()), Ask)
    clock.now += 1
    wait.step(wait_reply(done=2))
    assert wait.step(Due()) == FallBack("lease_wait_total", "waited too long in all")


# -- the absolute bound per fetch waited for -----------------------------------------

D = "sha256:" + "aa" * 32
AHEAD = "sha256:" + "bb" * 32
RATE = 256 * 1024
WINDOW = 30.0
SIZE = 64 << 20  # 256 s at the minimum rate


def rated(holder: str | None = "evil", done: int = 0, digest: str | None = D,
          size: int | None = SIZE) -> Replied:
    return Replied(LeaseReply(LeaseStatus.WAIT, holder=holder, bytes_done=done, size=size,
                              digest=digest, min_rate_bytes_s=RATE, rate_window_s=WINDOW))


def test_fake_progress_forever_ends_at_the_blobs_absolute_bound() -> None:
    clock = Clock()
    wait = LeaseWait(MAX_S, clock, blob=Blob(D, SIZE))
    wait.step(Due())
    first = clock.now
    action = None
    for n in range(1, 1000):  # one more byte per reply: "progress" that never ends
        clock.now += LONG_POLL_S
        wait.step(rated(done=n))
        action = wait.step(Due())
        if isinstance(action, FallBack):
            break
    assert action == FallBack("lease_bound", "the upstream fetch waited for passed its bound")
    bound = first + LONG_POLL_S + BOUND_FLOOR_S + WINDOW + SIZE / RATE
    assert wait.state.bound == bound and bound <= clock.now < bound + LONG_POLL_S


def test_the_bound_uses_this_nodes_own_size_not_the_holders_claim() -> None:
    clock = Clock()
    wait = LeaseWait(MAX_S, clock, blob=Blob(D, SIZE))
    wait.step(Due())
    wait.step(rated(size=1 << 50))  # a holder claiming a petabyte
    assert wait.state.bound == clock.now + BOUND_FLOOR_S + WINDOW + SIZE / RATE


def test_each_fetch_queued_ahead_gets_its_own_bound_once() -> None:
    clock = Clock()
    wait = LeaseWait(MAX_S, clock, blob=Blob(D, SIZE))
    wait.step(Due())
    wait.step(rated(holder="a", digest=AHEAD, size=RATE))  # 1 s at the rate
    ahead = wait.state.bound
    assert ahead == clock.now + BOUND_FLOOR_S + WINDOW + 1
    clock.now += 20
    wait.step(rated(holder="b", digest=D))  # the queue moved on to our own blob
    own = wait.state.bound
    assert own == clock.now + BOUND_FLOOR_S + WINDOW + SIZE / RATE
    clock.now += 45  # 65 s since AHEAD was first waited for, its bound 61 s
    wait.step(rated(holder="c", digest=AHEAD))  # back to one seen before: its old bound
    assert wait.state.bound == ahead
    assert wait.step(Due()) == FallBack(
        "lease_bound", "the upstream fetch waited for passed its bound"
    )


def test_a_wait_naming_no_holder_or_no_rate_sets_no_bound() -> None:
    clock = Clock()
    wait = LeaseWait(MAX_S, clock, blob=Blob(D, SIZE))
    wait.step(Due())
    wait.step(rated(holder=None, digest=None))  # a slot about to be taken
    wait.step(wait_reply(holder="a"))  # an older tracker: no rate
    assert wait.state.bound == float("inf") and wait.state.bounds == ()
