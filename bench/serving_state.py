"""What the node's serving.db costs at its bounds: size on disk, start-up read, one write.

Fills a `ServingState` (p2preg/node/servingstate.py) to the tenancy ledger's and
the tag map's bounds (1,000,000 grants, 10,000 tags) in a temp directory,
reads it back as a node does at start, then times the write one pull makes
(10 grants and a tag) with the file full. Prints the numbers and writes
`bench/results/serving-state.json`. Run: `python -m bench.serving_state`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from p2preg.core.digest import Digest
from p2preg.node.servingstate import FILE_NAME, ServingState
from p2preg.node.tagmap import MAX_TAG_ENTRIES, TagMap
from p2preg.node.tenancy import DEFAULT_MAX_ENTRIES, Tenancy

RESULTS = Path(__file__).resolve().parent / "results" / "serving-state.json"
BATCH = 10_000
PULL_WRITES = 20


def _digest(text: str) -> Digest:
    return Digest.of(text.encode(), "sha256")


def _fill(state: ServingState, tags: TagMap, tenancy: Tenancy) -> float:
    start = time.monotonic()
    for b in range(DEFAULT_MAX_ENTRIES // BATCH):
        tenancy.grant("seed.test", f"team/app{b % 50}", [_digest(f"{b}/{j}") for j in range(BATCH)])
        state.write([], tenancy.take_unsaved())
    for i in range(MAX_TAG_ENTRIES):
        tags.seen(("seed.test", "team/app", f"t{i}", ""), _digest(str(i)), float(i))
    state.write(tags.take_unsaved(), [])
    return time.monotonic() - start


def _pull_writes(state: ServingState, tags: TagMap, tenancy: Tenancy) -> float:
    start = time.monotonic()
    for i in range(PULL_WRITES):
        tenancy.grant("seed.test", "pull", [_digest(f"pull{i}/{j}") for j in range(10)])
        tags.seen(("seed.test", "pull", f"p{i}", ""), _digest(f"pull{i}"), 1e9 + i)
        state.write(tags.take_unsaved(), tenancy.take_unsaved())
    return (time.monotonic() - start) / PULL_WRITES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where the temp file goes")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serving-state-", dir=args.dir))
    try:
        tags, tenancy = TagMap(ttl_s=30, stale_s=3600), Tenancy()
        state = ServingState(work / FILE_NAME, tags, tenancy)
        state.open()
        fill_s = _fill(state, tags, tenancy)
        state.close()
        size = (work / FILE_NAME).stat().st_size
        tags, tenancy = TagMap(ttl_s=30, stale_s=3600), Tenancy()
        state = ServingState(work / FILE_NAME, tags, tenancy)
        start = time.monotonic()
        state.open()
        load_s = time.monotonic() - start
        write_s = _pull_writes(state, tags, tenancy)
        state.close()
    finally:
        shutil.rmtree(work)
    result = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "grants": len(tenancy), "tags": len(tags), "file_bytes": size,
        "fill_s": round(fill_s, 1), "load_s": round(load_s, 2),
        "pull_write_ms": round(write_s * 1000, 2),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
