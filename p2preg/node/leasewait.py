"""The node's wait for a blob's upstream lease, as a sans-IO state machine.

Owns the rules by which a node that needs a blob reads the tracker's lease
replies: SEEDED → join the swarm; GRANTED → fetch from upstream as the holder;
VERIFY → the same, as the node the tracker picked to settle a dispute over the
blob's torrent (the holder publishes what it made either way);
WAIT → ask again (long-polling) for as long as the fetch waited for makes
progress — its holder's `bytes_done` grows, or the holder changes because the
tracker's queue moved — but never past that fetch's absolute bound, derived
once per digest from its size and the minimum rate the tracker enforces on
holders, so no holder (a compromised node faking progress, a rotation of
them) keeps this node waiting; `lease_wait_max_s` without progress, the
bound, a tracker that fails or refuses us a lease → fetch from upstream
ourselves, with a reason (a metric label) — except tracker replicas standing by
while another takes the term over (`standing_by`, tracker/replica.py): one
serves again within about a term, so the node asks again, for up to
`TAKEOVER_WAIT_S`, rather than every waiting node going upstream at once. The
rules are one ordered table, `RULES`, read first match first: a new rule is a
new row. Time comes from an injected clock, as in tracker/leases.py's
`LeaseBook`. This module does no I/O and imports no trio: the caller asks the
tracker, sleeps and fetches (p2preg/node/fetch.py), and must not bend an
action it was given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from p2preg.core.wire import LeaseReply, LeaseStatus

# How long one lease request may be held open by the tracker.
LONG_POLL_S = 10.0
# A reply that came back sooner than this share of the long poll was not held
# by the tracker (an old tracker, or one under load): the next ask is paced.
HELD_SHARE = 0.8
# Pacing of asks the tracker answered early: its retry_after_s, within these bounds.
PACE_MIN_S = 0.05
PACE_MAX_S = 1.0
# A fetch waited for gets this long on top of one rate window and its size at
# the minimum rate (the holder's TLS, token and first-byte latency, the
# renewals' lag), from when this node first waited for it.
BOUND_FLOOR_S = 30.0
# How long a wait keeps asking while the tracker's replicas stand by for a
# takeover (the default term, 6 s, plus the third a standby waits between
# tries, with room), and how often it asks meanwhile.
TAKEOVER_WAIT_S = 12.0
TAKEOVER_PACE_S = 0.5
# A holder renews its lease at most this often.
RENEW_MIN_S = 0.25
# A renewal's timeout per tracker, in renewal intervals: an interval plus this
# (a renewal lost to a hung tracker, then answered by the next) stays below the
# silence of three intervals.
RENEW_TIMEOUT_SHARE = 1.5
# Distinct fetches one wait keeps a bound for (an image's blobs queued ahead);
# past that, a new one shares the last bound.
MAX_BOUNDS = 256

# -- what happens to the wait (events) ------------------------------------------


@dataclass(frozen=True, slots=True)
class Due:
    """It is time to ask the tracker (first, or again after an `AskAgain`)."""


@dataclass(frozen=True, slots=True)
class Replied:
    """The tracker answered the last `Ask`."""

    reply: LeaseReply


@dataclass(frozen=True, slots=True)
class TrackerFailed:
    """The last `Ask` failed: the tracker is down, or refused it (`code`, its error's)."""

    message: str
    code: str = ""


Event = Due | Replied | TrackerFailed

# -- what the node does next (actions) ------------------------------------------


@dataclass(frozen=True, slots=True)
class Ask:
    """Ask the tracker for the lease, letting it hold the request `wait_s`."""

    wait_s: float


@dataclass(frozen=True, slots=True)
class AskAgain:
    """Sleep `after_s` (0: not at all), then step `Due`."""

    after_s: float


@dataclass(frozen=True, slots=True)
class JoinSwarm:
    """A seeder exists: download from peers with this metainfo; `peers`: the tracker
    entered this node in the swarm and named these (None: announce to join), and
    `intervals` its answers' to the start and the completion (0: not named)."""

    metainfo: bytes
    peers: list[bytes] | None = None
    intervals: tuple[int, int] = (0, 0)


@dataclass(frozen=True, slots=True)
class FetchAsHolder:
    """This node holds the lease: fetch from upstream, renewing it every `renew_s`."""

    lease_id: str
    ttl_s: float
    # The tracker asked this node to settle a dispute over the blob's torrent.
    verify: bool = False
    # The tracker takes the fetch over from a holder silent this long (0: none).
    silence_s: float = 0.0

    @property
    def renew_s(self) -> float:
        """A third of the silence (of the TTL, if shorter or without one)."""
        quiet = min(self.silence_s, self.ttl_s) if self.silence_s > 0 else self.ttl_s
        return max(RENEW_MIN_S, quiet / 3)

    @property
    def renew_timeout_s(self) -> float:
        """How long one tracker gets to answer a renewal: a renewal sent to a hung
        replica and then to the next still lands within the silence."""
        return RENEW_TIMEOUT_SHARE * self.renew_s


@dataclass(frozen=True, slots=True)
class FallBack:
    """Stop waiting on the cluster and fetch from upstream; `reason` is a metric label."""

    reason: str
    message: str


Action = Ask | AskAgain | JoinSwarm | FetchAsHolder | FallBack
# The actions that end the wait.
Outcome = JoinSwarm | FetchAsHolder | FallBack

# -- the state, and the table ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WaitState:
    started_at: float
    # Waiting without progress ends here; progress moves it to now + max_s.
    deadline: float
    # The (holder, bytes_done) the tracker last reported.
    progress: tuple[str | None, int] | None = None
    # The absolute bound of each fetch waited for (digest, when to give up on
    # it), set when first seen and never moved; `bound` is the current one's.
    bounds: tuple[tuple[str, float], ...] = ()
    bound: float = float("inf")
    # When the last Ask was given, and how long it let the tracker hold it.
    asked_at: float = 0.0
    wait_s: float = 0.0
    # Since when every replica asked has been standing by (None: one answered).
    standby_since: float | None = None


@dataclass(frozen=True, slots=True)
class Situation:
    """What a rule sees: the event, the state it found (progress already noted), the time."""

    event: Event
    state: WaitState
    now: float
    max_s: float

    @property
    def reply(self) -> LeaseReply:
        assert isinstance(self.event, Replied), "a rule on replies applied to another event"
        return self.event.reply

    @property
    def status(self) -> LeaseStatus | None:
        return self.event.reply.status if isinstance(self.event, Replied) else None


@dataclass(frozen=True, slots=True)
class Rule:
    """When an `on` event arrives and `when` holds, the node does `then`."""

    name: str
    on: type[Due] | type[Replied] | type[TrackerFailed]
    when: Callable[[Situation], bool]
    then: Callable[[Situation], Action]

    def applies(self, s: Situation) -> bool:
        return isinstance(s.event, self.on) and self.when(s)


def _always(s: Situation) -> bool:
    return True


def _tracker_failed(s: Situation) -> Action:
    assert isinstance(s.event, TrackerFailed)
    return FallBack("tracker", f"tracker: {s.event.message}")


def _out_of_time(s: Situation) -> bool:
    return s.now >= s.state.deadline


def _past_bound(s: Situation) -> bool:
    return s.now >= s.state.bound


def _taking_over(s: Situation) -> bool:
    since = s.state.standby_since
    return (
        isinstance(s.event, TrackerFailed)
        and s.event.code == "standing_by"
        and since is not None
        and s.now - since < TAKEOVER_WAIT_S
    )


def _refused_at_cap(s: Situation) -> bool:
    return isinstance(s.event, TrackerFailed) and s.event.code == "lease_cap"


def _ask(s: Situation) -> Action:
    return Ask(min(LONG_POLL_S, s.state.deadline - s.now, s.state.bound - s.now))


def _seeded_without_metainfo(s: Situation) -> bool:
    return s.status is LeaseStatus.SEEDED and s.reply.metainfo is None


def _join(s: Situation) -> Action:
    r = s.reply
    assert r.metainfo is not None
    return JoinSwarm(r.metainfo, r.peers, (r.announce_interval_s, r.seeder_interval_s))


def _granted_without_id(s: Situation) -> bool:
    return s.status is LeaseStatus.GRANTED and not s.reply.lease_id


def _hold(s: Situation) -> Action:
    assert s.reply.lease_id is not None
    return FetchAsHolder(s.reply.lease_id, s.reply.ttl_s, silence_s=s.reply.silence_s)


def _verify(s: Situation) -> Action:
    if not s.reply.lease_id:
        return FallBack("tracker", "tracker asked to verify without naming the lease")
    return FetchAsHolder(
        s.reply.lease_id, s.reply.ttl_s, verify=True, silence_s=s.reply.silence_s
    )


def _held_its_course(s: Situation) -> bool:
    return s.status is LeaseStatus.WAIT and s.now - s.state.asked_at >= HELD_SHARE * s.state.wait_s


def _pace(s: Situation) -> Action:
    return AskAgain(min(max(s.reply.retry_after_s, PACE_MIN_S), PACE_MAX_S))


def _status_is(status: LeaseStatus) -> Callable[[Situation], bool]:
    return lambda s: s.status is status


RULES: tuple[Rule, ...] = (
    Rule(
        "a lease refused at this node's cap: fall back",
        TrackerFailed,
        _refused_at_cap,
        lambda s: FallBack("lease_cap", "the tracker refused a lease: this node holds its cap"),
    ),
    Rule(
        "replicas standing by while another takes over: ask again, for a while",
        TrackerFailed,
        _taking_over,
        lambda s: AskAgain(TAKEOVER_PACE_S),
    ),
    Rule("a tracker that fails: fall back", TrackerFailed, _always, _tracker_failed),
    Rule(
        "past the absolute bound of the fetch waited for: fall back",
        Due,
        _past_bound,
        lambda s: FallBack("lease_bound", "the upstream fetch waited for passed its bound"),
    ),
    Rule(
        "lease_wait_max_s without progress: fall back",
        Due,
        _out_of_time,
        lambda s: FallBack("lease_wait", "the upstream fetch waited for made no progress"),
    ),
    Rule("due: ask, long-polling at most until the deadline", Due, _always, _ask),
    Rule(
        "seeded without metainfo: fall back",
        Replied,
        _seeded_without_metainfo,
        lambda s: FallBack("bad_metainfo", "tracker said SEEDED without metainfo"),
    ),
    Rule("seeded: join the swarm", Replied, _status_is(LeaseStatus.SEEDED), _join),
    Rule(
        "granted without a lease id: fall back",
        Replied,
        _granted_without_id,
        lambda s: FallBack("tracker", "tracker granted a lease without naming it"),
    ),
    Rule("granted: fetch from upstream as the holder", Replied, _status_is(LeaseStatus.GRANTED),
         _hold),
    Rule("verify: fetch from upstream as the holder, to settle a dispute", Replied,
         _status_is(LeaseStatus.VERIFY), _verify),
    # A long poll that ran its course already waited.
    Rule("wait, held by the tracker: ask again at once", Replied, _held_its_course,
         lambda s: AskAgain(0.0)),
    Rule("wait, answered early: ask again after retry_after_s", Replied,
         _status_is(LeaseStatus.WAIT), _pace),
    Rule(
        "a reply this node does not know: fall back",
        Replied,
        _always,
        lambda s: FallBack("tracker", f"tracker replied {s.reply.status!r}"),
    ),
)


def note_progress(state: WaitState, event: Event, now: float, max_s: float) -> WaitState:
    """A WAIT whose (holder, bytes_done) changed means the cluster moves: the deadline resets."""
    if not isinstance(event, Replied) or event.reply.status is not LeaseStatus.WAIT:
        return state
    seen = (event.reply.holder, event.reply.bytes_done)
    if seen == state.progress:
        return state
    return replace(state, progress=seen, deadline=now + max_s)


def note_standby(state: WaitState, event: Event, now: float) -> WaitState:
    """When the replicas started standing by (a takeover), until one answers."""
    if isinstance(event, Replied) and state.standby_since is not None:
        return replace(state, standby_since=None)
    standing = isinstance(event, TrackerFailed) and event.code == "standing_by"
    if standing and state.standby_since is None:
        return replace(state, standby_since=now)
    return state


@dataclass(frozen=True, slots=True)
class Blob:
    """The blob this node waits for: its digest and size (-1: unknown)."""

    digest: str | None = None
    size: int = -1


def note_bound(state: WaitState, event: Event, now: float, max_s: float, blob: Blob) -> WaitState:
    """A WAIT about a fetch (the blob's own, or one queued ahead of it) bounds the wait.

    The bound is set when a digest is first waited for and never moves: the
    floor, one rate window (a holder that falls behind is replaced within
    it) and the blob's size at the minimum rate (this node's own size for its
    own blob: a holder cannot talk it up). A WAIT naming no holder is a moment
    between two fetches of the queue, and a tracker with no minimum rate
    sets no bound.
    """
    if not isinstance(event, Replied):
        return state
    reply = event.reply
    if reply.status is not LeaseStatus.WAIT or reply.holder is None:
        return state
    if reply.min_rate_bytes_s <= 0:
        return state
    key = reply.digest or blob.digest or ""
    known = dict(state.bounds)
    if key in known:
        return replace(state, bound=known[key])
    if len(known) >= MAX_BOUNDS:
        return state
    own = key == (blob.digest or "") and blob.size >= 0
    size = blob.size if own else reply.size
    need = max_s if size is None or size < 0 else size / reply.min_rate_bytes_s
    bound = now + BOUND_FLOOR_S + reply.rate_window_s + need
    return replace(state, bounds=(*state.bounds, (key, bound)), bound=bound)


def decide(s: Situation, rules: tuple[Rule, ...] = RULES) -> tuple[Rule, Action]:
    """The first rule that applies, and its action."""
    for rule in rules:
        if rule.applies(s):
            return rule, rule.then(s)
    raise AssertionError(f"no lease-wait rule for {s.event!r}")  # the table ends in catch-alls


class LeaseWait:
    """One node's wait for one blob's lease: feed it events, do what it returns."""

    def __init__(
        self,
        max_s: float,
        clock: Callable[[], float],
        rules: tuple[Rule, ...] = RULES,
        *,
        blob: Blob = Blob(),
    ) -> None:
        self.max_s = max_s
        self._clock = clock
        self._rules = rules
        self._blob = blob
        now = clock()
        self.state = WaitState(started_at=now, deadline=now + max_s)
        # The name of the rule behind the last action, for logs and tests.
        self.last_rule = ""

    def step(self, event: Event) -> Action:
        now = self._clock()
        self.state = note_progress(self.state, event, now, self.max_s)
        self.state = note_bound(self.state, event, now, self.max_s, self._blob)
        self.state = note_standby(self.state, event, now)
        rule, action = decide(Situation(event, self.state, now, self.max_s), self._rules)
        self.last_rule = rule.name
        if isinstance(action, Ask):
            self.state = replace(self.state, asked_at=now, wait_s=action.wait_s)
        return action
