"""The tracker as a server: k replicas, each a FIFO queue, a service time per request.

Owns when a request the simulated tracker receives is applied, given what the
replicas are busy with. One replica serves (it applies every request and alone
answers the control API: standbys answer it 503, docs/TRACKER.md "Standing
by"); the others are announce fronts (tracker/fronts.py): an announce from a
node given every replica goes to replica `node mod k`, a front does its TLS
handshake and forwards it, and the serving replica applies it. A node's
control calls (lease requests, renewals, releases, publishes) go over its own
kept-alive connections, as httpx's pool keeps them: a call finds an idle
connection used within the tracker's 5 s keep-alive, or opens one (a
handshake); a long-polled lease request holds its connection until answered,
so a node asking for 10 layers at once opens 10. Announces are either
`direct` (libtorrent's HTTPS announce: a handshake each) or `relayed` (batched
over a control connection the node keeps open to the serving replica; then
its control calls travel there too and pay no handshake either). Service times
are `Costs` (from docs/BENCHMARKS.md, named there). `replicas = 0` answers
every request at once (the model before this one). It records each request's
wait in its queue, each queue's busy time and the time requests waited at all
(saturated). `lag` is the serving replica's queue delay, what the real
tracker's lag meter measures (tracker/lagmeter.py): the longest a request
waited there over the last `hold_s`, or what one arriving now would wait,
whichever is more; the simulated tracker's LeaseBook reads it as the real one
does. It must not decide anything about leases or peers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

Schedule = Callable[[float, Callable[[], None]], None]

# `entered`: relayed, and the control calls stand for a node's start, completion and
# seeding announces (docs/TRACKER.md, "Announces a control call already made").
ANNOUNCE_PATHS = ("direct", "relayed", "entered")
KEEPALIVE_S = 5.0  # the tracker closes a connection idle this long (docs/TRACKER.md)


@dataclass(frozen=True)
class Costs:
    """Seconds of a replica's CPU per request (docs/BENCHMARKS.md, "Three replicas with
    announce fronts", mTLS rows; 2026-12-06)."""

    # A request on a new mutual-TLS connection, answered by the serving replica
    # itself: the handshake and the request (2,407 µs per direct mTLS announce).
    handshake_s: float = 2.407e-3
    # A request on a kept-alive mTLS connection at a saturated serving replica
    # (docs/BENCHMARKS.md, "Kept-alive requests at a saturated tracker",
    # 2026-12-07, the highest of three runs): a relayed batch of one announce
    # (279 µs) stands for a renewal, a release, a publish or a confirmation; a
    # lease request answered SEEDED with 50 peers took 318 µs. (585 and 721 µs before
    # the tracker's own HTTP framing and the lazy hang-up watch, measured with
    # the tracker 60 to 66 % busy; 0.2 ms for both until then.)
    call_s: float = 0.279e-3
    ask_s: float = 0.318e-3
    # A lease request held open and woken (docs/BENCHMARKS.md, "What a woken long
    # poll costs", 2026-12-07, plain HTTP, the highest of the runs): answered, its
    # SEEDED answer made and sent, 260 µs, after an arrival that read and held it,
    # 195 µs; every lease request is charged `ask_s` on arrival, an answer included,
    # so a woken one's answer adds 195 + 260 - 318 = 137 µs. Sent back to wait
    # (woken, still waiting): 45 µs more.
    woken_s: float = 0.137e-3
    repark_s: float = 0.045e-3
    # A front's handshake and forward of one announce (3,348 µs) and what the
    # serving replica spends on the forwarded announce (699 µs at batches of 1.9).
    front_s: float = 3.348e-3
    forwarded_s: float = 0.699e-3
    # An announce relayed over the node's kept-alive control connection, batched.
    relayed_s: float = 0.2e-3
    # A seed confirmation riding a lease request: only its own work, as an announce
    # in a relayed batch of 32 (~40 µs each, the request's share included), rounded.
    riding_s: float = 0.04e-3
    # With control fronts: the rules core's work per forwarded item (a decision,
    # a rider, a relayed announce, a woken request answered: an announce in a
    # relayed batch of 32, rounded) and one sent back to wait, and a forward's
    # one-way trip between a front and the serving replica.
    decide_s: float = 0.04e-3
    hop_s: float = 1e-3


@dataclass
class Queue:
    """One replica's CPU: requests served first come, first served."""

    free_at: float = 0.0
    busy_s: float = 0.0
    waits: list[float] = field(default_factory=list)
    saturated_s: float = 0.0
    _waited_until: float = 0.0
    # (when served, wait) with waits falling: the longest wait since any time.
    _peaks: deque[tuple[float, float]] = field(default_factory=deque)

    def serve(self, now: float, cost: float) -> float:
        """A request arriving `now` (calls come in time order); when it is done."""
        start = max(now, self.free_at)
        self.free_at = start + cost
        self.busy_s += cost
        self.waits.append(start - now)
        while self._peaks and self._peaks[-1][1] <= start - now:
            self._peaks.pop()
        self._peaks.append((start, start - now))
        # The union of the spans requests spent waiting.
        if start > now:
            self.saturated_s += start - max(now, self._waited_until)
            self._waited_until = start
        return self.free_at

    def lag(self, now: float, hold_s: float) -> float:
        """The longest wait of a request served over the last `hold_s`, or the
        wait of one arriving `now`, whichever is more."""
        while self._peaks and self._peaks[0][0] < now - hold_s:
            self._peaks.popleft()
        return max(self.free_at - now, self._peaks[0][1] if self._peaks else 0.0, 0.0)


class TrackerServers:
    def __init__(
        self,
        replicas: int,
        announces: str,
        costs: Costs,
        clock: Callable[[], float],
        schedule: Schedule,
        hold_s: float = 1.0,
        workers: int = 0,
    ) -> None:
        if replicas < 0 or announces not in ANNOUNCE_PATHS or workers < 0:
            raise ValueError(
                f"replicas ≥ 0, workers ≥ 0; announces one of {', '.join(ANNOUNCE_PATHS)}"
            )
        if workers and (not replicas or announces == "direct"):
            raise ValueError("control fronts need replicas and kept-alive announces")
        self.replicas = replicas
        self.announces = announces
        self.costs = costs
        self._clock = clock
        self._schedule = schedule
        self.serving = Queue()
        self.workers = workers
        # Announce fronts (the standbys), or with `workers` every control front.
        self.fronts = [Queue() for _ in range(replicas * workers or max(0, replicas - 1))]
        # Node → when each of its idle control connections was last used.
        self._idle: dict[int, list[float]] = {}
        self.handshakes = 0
        self.hold_s = hold_s

    def lag(self) -> float:
        """The serving replica's queue delay now, s (the tracker's lag); with control
        fronts, the longest of theirs and the rules core's."""
        if not self.replicas:
            return 0.0
        now = self._clock()
        queues = [self.serving, *self.fronts] if self.workers else [self.serving]
        return max(q.lag(now, self.hold_s) for q in queues)

    def _forward(self, node: int, cost: float, items: int, apply: Callable[[], None]) -> None:
        """Through `node`'s control front (`cost`) to the rules core (`items` of
        `Costs.decide_s`); `apply` once the decision is back at the front."""
        c = self.costs
        at = self.fronts[node % len(self.fronts)].serve(self._clock(), cost)

        def decide() -> None:
            self._schedule(self.serving.serve(at + c.hop_s, items * c.decide_s) + c.hop_s, apply)

        self._schedule(at + c.hop_s, decide)

    def control(
        self, node: int, apply: Callable[[], None], riders: int = 0, *, ask: bool = False
    ) -> None:
        """A control call from `node`: `apply` runs once the serving replica handled it
        (and the `riders` seed confirmations it carries, `Costs.riding_s` each); `ask`:
        a lease request (`Costs.ask_s` in place of `call_s`).

        The caller says when the answer has left (`answered`): its connection is
        then idle again.
        """
        if not self.replicas:
            apply()
            return
        now = self._clock()
        idle = [at for at in self._idle.get(node, ()) if now - at < KEEPALIVE_S]
        if self.announces != "direct":  # over the connection kept open
            cost = self.costs.call_s
        elif idle:
            idle.pop()
            cost = self.costs.call_s
        else:
            cost = self.costs.handshake_s
            self.handshakes += 1
        self._idle[node] = idle
        cost += riders * self.costs.riding_s + (self.costs.ask_s - self.costs.call_s) * ask
        if self.workers:
            self._forward(node, cost, 1 + riders, apply)
            return
        self._schedule(self.serving.serve(now, cost), apply)

    def woken(self, node: int, answered: bool) -> float:
        """`node`'s held lease request woken now: when the serving replica (with
        control fronts, and then its front) has answered it (`answered`) or sent it
        back to wait."""
        now, c = self._clock(), self.costs
        if not self.replicas:
            return now
        if not self.workers:
            return self.serving.serve(now, c.woken_s if answered else c.repark_s)
        decided = self.serving.serve(now, c.decide_s if answered else c.repark_s)
        if not answered:
            return decided
        return self.fronts[node % len(self.fronts)].serve(decided + c.hop_s, c.woken_s)

    def answered(self, node: int) -> None:
        """A control call's answer left: its connection is kept alive for the next."""
        if self.replicas:
            self._idle.setdefault(node, []).append(self._clock())

    def announce(self, node: int, apply: Callable[[], None]) -> None:
        """An announce from `node`: `apply` runs once the serving replica applied it."""
        if not self.replicas:
            apply()
            return
        now = self._clock()
        if self.workers:
            self._forward(node, self.costs.relayed_s, 1, apply)
            return
        if self.announces != "direct":
            self._schedule(self.serving.serve(now, self.costs.relayed_s), apply)
            return
        self.handshakes += 1
        at = node % self.replicas
        if at == 0:
            self._schedule(self.serving.serve(now, self.costs.handshake_s), apply)
            return
        forwarded = self.fronts[at - 1].serve(now, self.costs.front_s)

        def forward() -> None:
            self._schedule(self.serving.serve(forwarded, self.costs.forwarded_s), apply)

        self._schedule(forwarded, forward)

    def stats(self, span_s: float) -> dict[str, float]:
        """Queue delays at the serving replica and the fronts, and how busy they were."""
        waits = sorted(self.serving.waits)
        front_waits = sorted(w for f in self.fronts for w in f.waits)

        def pct(xs: list[float], q: float) -> float:
            return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0

        span = max(span_s, 1e-9)
        return {
            "requests": float(len(waits)),
            "wait_p50_s": pct(waits, 0.50),
            "wait_p99_s": pct(waits, 0.99),
            "wait_max_s": waits[-1] if waits else 0.0,
            "saturated_s": self.serving.saturated_s,
            "busy_share": self.serving.busy_s / span,
            "front_wait_p99_s": pct(front_waits, 0.99),
            "front_wait_max_s": front_waits[-1] if front_waits else 0.0,
            "front_saturated_s": max((f.saturated_s for f in self.fronts), default=0.0),
            "handshakes": float(self.handshakes),
        }
