"""bench/tracker_redis.py: Redis's work between two INFO snapshots, the snapshots' own left out.

The arithmetic is checked on INFO text as Redis 7.0 writes it; then against a
real redis-server: two snapshots back to back see no command at all, and a
script that runs two SETs is three commands (the EVAL and the two it ran), as
`total_commands_processed` and `INFO commandstats` count them, beside its
client's AUTH.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.tracker_redis import RedisStats, cost_between, open_redis_store, parse_info

INFO = """# Stats
total_connections_received:12
total_commands_processed:{total}
instantaneous_ops_per_sec:3

# CPU
used_cpu_sys:{sys}
used_cpu_user:{user}
used_cpu_sys_children:0.000000
used_cpu_user_children:0.000000

# Commandstats
cmdstat_hset:calls={hset},usec=80,usec_per_call=2.00,rejected_calls=0,failed_calls=0
cmdstat_eval:calls={eval},usec=300,usec_per_call=7.50,rejected_calls=0,failed_calls=0
cmdstat_info:calls={info},usec=59,usec_per_call=59.00,rejected_calls=0,failed_calls=0
cmdstat_auth:calls={auth},usec=20,usec_per_call=6.67,rejected_calls=0,failed_calls=0
"""


def _info(**values: float) -> list[str]:
    return INFO.format(**values).splitlines()


def test_info_is_read_into_the_counters_a_cost_needs() -> None:
    got = parse_info(_info(total=100, sys=0.25, user=0.5, hset=40, eval=10, info=3, auth=3))
    assert got == RedisStats(100, 0.75, {"hset": 40, "eval": 10, "info": 3, "auth": 3})


def test_a_cost_is_the_difference_less_the_snapshots_own_commands() -> None:
    before = parse_info(_info(total=100, sys=0.25, user=0.5, hset=40, eval=10, info=3, auth=3))
    # 1,000 HSETs run by 10 scripts, plus the first snapshot's INFO and the second's AUTH.
    after = parse_info(_info(total=1112, sys=0.5, user=1.0, hset=1040, eval=20, info=4, auth=4))
    cost = cost_between(before, after)
    assert cost.commands == 1010
    assert cost.calls == {"hset": 1000, "eval": 10}
    assert cost.cpu_s == pytest.approx(0.75)
    assert cost.commands_per(505) == pytest.approx(2.0)
    assert cost.cpu_us_per(750) == pytest.approx(1000.0)


def test_counters_that_went_back_are_refused() -> None:
    after = parse_info(_info(total=100, sys=0.25, user=0.5, hset=40, eval=10, info=3, auth=3))
    before = parse_info(_info(total=500, sys=0.5, user=1.0, hset=400, eval=20, info=4, auth=4))
    with pytest.raises(ValueError, match="went back"):
        cost_between(before, after)


def test_a_reply_without_the_counters_is_refused() -> None:
    with pytest.raises(ValueError, match="total_commands_processed"):
        parse_info(["# Stats", "total_connections_received:12"])
    broken = _info(total=1, sys=0.1, user=0.1, hset=1, eval=1, info=1, auth=1)
    broken[-1] = "cmdstat_auth:usec=20"
    with pytest.raises(ValueError, match="calls"):
        parse_info(broken)


@pytest.mark.integration
def test_a_real_redis_counts_a_script_and_its_commands_and_no_snapshot(tmp_path: Path) -> None:
    with open_redis_store(tmp_path, core=None) as redis:
        first = redis.stats()
        second = redis.stats()
        assert cost_between(first, second).commands == 0
        redis.server.cli("EVAL", "redis.call('SET', 'a', '1') redis.call('SET', 'b', '2')", "0")
        cost = cost_between(second, redis.stats())
        # The EVAL's redis-cli logged in first: that AUTH is the only other command.
        assert (cost.commands, cost.calls) == (4, {"auth": 1, "eval": 1, "set": 2})
        assert "--store-password-file" in redis.tracker_args
        password = redis.server.password
        assert password is not None
        assert password not in " ".join(redis.tracker_args)
