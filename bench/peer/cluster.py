"""bench.peer's control plane: its trackers, and each peer's place there as a node's.

Owns the tracker processes (plain with a token; or mutual TLS, of a fresh
cluster CA, for the TLS pair), the piece-size rule both sides check
(`--piece-kib`), and who every peer is to the tracker. The tracker keeps one
peer per identity in a swarm and counts `left=0` only from the torrent's
publisher or a confirmed seeder, so peers announce as distinct nodes: under
their own `node=` name with the token (`seed`, `leech-0`…), or under their
certificate's node (`seed`, `leech`). The seeder's identity files the blob as
a node that fetched it upstream does (`p2preg.node.fetch`): it takes the
digest's lease, reports the fetch complete, publishes the metainfo, and gives
the lease back once its own announce was answered. Leechers do not confirm
(a node confirms after verifying the whole blob; the worker hashes only with
`--verify`), so the tracker hands them out as downloaders, which changes no
round: every peer gets every other in one answer. The slow-peer rounds have
a tracker of their own where the blob is filed with no seeder (`file_only`),
and their seeders join as nodes that verified the blob (`joining_seeder`:
confirmed, so counted as seeders). It must not time anything nor loosen a
tracker rule.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

import p2preg.core.metainfo as metainfo_rules
from bench.peer.rounds import REPO_ROOT, Peer, peers
from bench.peer.worker import READY_TIMEOUT_S
from harness.tlscerts import ClusterCA
from harness.tracker import TRACKER_COMMAND, open_tracker
from p2preg.core import wire
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo, info_name
from p2preg.core.pki import Identity, issue
from p2preg.core.tls import ReloadingTLS
from tracker.client import TrackerClient

TOKEN = "bench-peer-token"
SEEDER = "seed"


def leecher(i: int) -> str:
    """The node name leecher `i` announces under (the same in every round: a node back)."""
    return f"leech-{i}"


@contextlib.contextmanager
def piece_rule(piece_bytes: int | None) -> Iterator[None]:
    """Force one piece size in this process's metainfo rules (`--piece-kib` only)."""
    if piece_bytes is None:
        yield
        return
    saved = metainfo_rules.MIN_PIECE_BYTES, metainfo_rules.MAX_PIECE_BYTES
    metainfo_rules.MIN_PIECE_BYTES = metainfo_rules.MAX_PIECE_BYTES = piece_bytes
    try:
        yield
    finally:
        metainfo_rules.MIN_PIECE_BYTES, metainfo_rules.MAX_PIECE_BYTES = saved


@contextlib.contextmanager
def tracker(
    workdir: Path, piece_bytes: int | None, *, tls_dir: Path | None = None
) -> Iterator[str]:
    """A real tracker process; with a forced piece size, one that checks that rule instead.

    With `tls_dir`, a tracker of that cluster (no token): it takes SSL torrents."""
    command = TRACKER_COMMAND
    if piece_bytes is not None:
        patch = (
            "import sys, p2preg.core.metainfo as m; "
            f"m.MIN_PIECE_BYTES = m.MAX_PIECE_BYTES = {piece_bytes}; "
            "from p2preg.cli import main; sys.exit(main(sys.argv[1:]))"
        )
        command = (sys.executable, "-c", patch)
    args = ["--log-level", "WARNING"]
    # The mTLS tracker answers /healthz on its plain metrics listener only (open_tracker's).
    token = TOKEN if tls_dir is None else None
    with open_tracker(
        workdir, token=token, args=args, command=command, cwd=REPO_ROOT, tls_dir=tls_dir
    ) as t:
        yield t.url


@dataclass(frozen=True)
class Member:
    """One node of a benchmark tracker: its name, and its certificates under mTLS."""

    url: str
    node: str
    tls_dir: Path | None = None

    def client(self) -> TrackerClient:
        if self.tls_dir is None:
            return TrackerClient(self.url, node=self.node, token=TOKEN)
        return TrackerClient(self.url, node=self.node, tls=ReloadingTLS(self.tls_dir, role="node"))


async def _announce_urls(members: list[Member]) -> list[str]:
    urls = []
    for member in members:
        client = member.client()
        urls.append(client.announce_url)
        await client.aclose()
    return urls


def announce_urls(members: list[Member]) -> list[str]:
    """Each member's announce URL, as its node would give libtorrent."""
    return trio.run(_announce_urls, members)


async def _file(member: Member, meta: Metainfo) -> str:
    """Take the lease, report the (already done) upstream fetch, publish; the lease id."""
    client = member.client()
    try:
        reply = await client.acquire_lease(meta.digest, size=meta.size)
        if reply.status is not wire.LeaseStatus.GRANTED or reply.lease_id is None:
            raise RuntimeError(
                f"bench.peer: {member.node} asked for the lease of a new blob and got"
                f" {reply.status} (holder {reply.holder})"
            )
        await client.renew_lease(meta.digest, reply.lease_id, meta.size, meta.size)
        await client.publish_metainfo(meta.digest, meta.size, meta.data)
    finally:
        await client.aclose()
    return reply.lease_id


async def _release(member: Member, digest: Digest, lease_id: str) -> None:
    client = member.client()
    try:
        await client.release_lease(digest, lease_id)
    finally:
        await client.aclose()


@contextlib.contextmanager
def seeding(
    args: argparse.Namespace,
    member: Member,
    meta: Metainfo,
    torrent: Path,
    seed_dir: Path,
    extra: Sequence[str] = (),
) -> Iterator[Peer]:
    """The seeder process of `meta` (the torrent file `torrent`), filed by `member` first.

    The tracker refuses announces for a torrent it does not hold, so the
    metainfo is filed before the seeder starts; the lease goes back once the
    seeder's announce was answered (its `ready`): released any sooner, the
    next asker would find no seeder (the node's `_release_once_seeding`).
    """
    lease_id = trio.run(_file, member, meta)
    (announce,) = announce_urls([member])
    with peers(args, "seed", torrent, [seed_dir], [announce], extra) as (seeder,):
        seeder.expect("ready", READY_TIMEOUT_S)
        trio.run(_release, member, meta.digest, lease_id)
        yield seeder


async def _confirm(member: Member, meta: Metainfo) -> None:
    client = member.client()
    try:
        await client.confirm_seed(meta.digest, meta.info_hash_v2)
    finally:
        await client.aclose()


@contextlib.contextmanager
def joining_seeder(
    args: argparse.Namespace,
    member: Member,
    meta: Metainfo,
    torrent: Path,
    blob: Path,
    workdir: Path,
    extra: Sequence[str] = (),
) -> Iterator[Peer]:
    """Another seeder of the filed `meta`, as a node that downloaded and verified it:
    confirmed with the tracker, its own hard link of `blob` under `workdir`
    (which holds its log), the file checked whole before its announce (no seed
    mode, so the round it serves pays no first-send checks). Started, not
    waited for: it says `ready` once checked and announced."""
    save = workdir / "data"
    save.mkdir(parents=True)
    os.link(blob, save / info_name(meta.digest))
    trio.run(_confirm, member, meta)
    (announce,) = announce_urls([member])
    with peers(args, "seed", torrent, [save], [announce], ("--full-check", *extra)) as (s,):
        yield s


def file_only(member: Member, meta: Metainfo) -> None:
    """File `meta` as `member` would after an upstream fetch, and give the lease back at
    once: for a swarm whose seeders all join later (`joining_seeder`)."""
    lease_id = trio.run(_file, member, meta)
    trio.run(_release, member, meta.digest, lease_id)


@dataclass(frozen=True)
class TLSCluster:
    """A fresh cluster CA's pieces for the TLS pair: the seeder's and leecher's tls_dirs,
    the tracker's, and the CA certificate that roots the SSL torrent."""

    seed: Path
    leech: Path
    tracker: Path
    root_pem: bytes

    @classmethod
    def make(cls, out: Path) -> TLSCluster:
        ca = ClusterCA.make("bench")
        seed = ca.tls_dir(out / "tls-seed", "node", SEEDER)
        leech = ca.tls_dir(out / "tls-leech", "node", "leech")
        return cls(seed, leech, tracker_tls_dir(ca, out / "tls-tracker"), ca.cert_pem)


def tracker_tls_dir(ca: ClusterCA, out: Path) -> Path:
    """The tracker's tls_dir: its certificate names 127.0.0.1, as libtorrent checks."""
    leaf = issue(ca.ca, Identity(ca.cluster, "tracker", "bench"), ips=["127.0.0.1"])
    out.mkdir(mode=0o700)
    for name, data, mode in (
        ("tls.crt", leaf.cert_pem, 0o644),
        ("tls.key", leaf.key_pem, 0o600),
        ("ca.crt", ca.cert_pem, 0o644),
    ):
        fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return out
