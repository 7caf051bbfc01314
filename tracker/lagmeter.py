"""How late the tracker runs: the lag its lease windows forgive (leases.py `LeaseBook.lag`).

The tracker is one trio loop on one core. When it is behind — a burst of
handshakes and requests, a long sweep, the process stopped or starved of CPU —
a holder's renewal waits in its queue, and the time it waits is the tracker's
lateness, not the holder's silence. `LagMeter.run` sleeps `interval_s` over and
over and measures how much later than asked it woke up: every task runnable
before it (the loop's run queue) and any time the process did not run at all
shows up in that oversleep. The lag is the largest oversleep seen over the last
`hold_s` (so a renewal that waited behind a stall is still forgiven when it is
finally read), bounded by `max_s`.

It does not see work waiting outside the loop: connections the kernel holds in
the listening socket's accept backlog, bytes in socket buffers not yet read,
nor a renewal delayed on the network. Sans-IO apart from `run`: `record` takes
a sample and the time, `__call__` answers the lag now.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio

# How often the meter wakes, s: the finest lag it can see.
INTERVAL_S = 0.05


class LagMeter:
    def __init__(
        self,
        clock: Callable[[], float],
        *,
        hold_s: float,
        max_s: float,
        interval_s: float = INTERVAL_S,
    ) -> None:
        if interval_s <= 0 or hold_s < 0 or max_s < 0:
            raise ValueError("interval_s > 0, hold_s ≥ 0 and max_s ≥ 0")
        self.interval_s = interval_s
        self.hold_s = hold_s
        self.max_s = max_s
        self._clock = clock
        # (when, oversleep) of the samples within `hold_s`; a sample per interval.
        self._samples: deque[tuple[float, float]] = deque(
            maxlen=int(hold_s / interval_s) + 2
        )
        self._value = 0.0
        # Oversleep summed since start, s (a counter: a stall shows up for good).
        self.total_s = 0.0

    def __call__(self) -> float:
        """The tracker's lag now, s: 0 ≤ lag ≤ `max_s`."""
        return self._value

    def record(self, late_s: float, now: float) -> None:
        """One sample: the meter woke `late_s` later than it asked, at `now`."""
        late_s = max(0.0, late_s)
        self.total_s += late_s
        self._samples.append((now, late_s))
        while self._samples and now - self._samples[0][0] > self.hold_s:
            self._samples.popleft()
        self._value = min(self.max_s, max((late for _, late in self._samples), default=0.0))

    async def run(self) -> None:
        """Measure forever; run it in the tracker's nursery."""
        while True:
            asked = trio.current_time() + self.interval_s
            await trio.sleep_until(asked)
            woke = trio.current_time()
            self.record(woke - asked, self._clock())
