"""A repository's tag list and a manifest's referrers, as upstream gives them.

Owns the two listings the node passes through rather than caches: the tags of a
repository, and the referrers of a subject (the referrers API, else the
`<alg>-<hex>` tag schema), filtered by artifact type; the manifests a referrers
index names are granted to the repository in the tenancy ledger. It must not
keep either listing: both change upstream without a digest to check them by.
"""

from __future__ import annotations

from p2preg.core.digest import Digest
from p2preg.node import manifest as mf
from p2preg.node.errors import NameUnknown, UpstreamError
from p2preg.node.seams import UpstreamSeam
from p2preg.node.tenancy import Tenancy


async def tags(client: UpstreamSeam, repository: str) -> list[str]:
    tags = await client.tags(repository)
    if tags is None:
        raise NameUnknown(f"repository {repository} is unknown to the seed registry")
    return sorted(set(tags))


async def referrers(
    tenancy: Tenancy,
    client: UpstreamSeam,
    repository: str,
    subject: Digest,
    artifact_type: str | None,
) -> bytes:
    """Referrers of `subject` as an OCI index, from the API or the tag schema."""
    headers = {"Accept": mf.OCI_INDEX}
    fetched = await client.fetch(
        "GET",
        repository,
        f"referrers/{subject}",
        headers=headers,
        max_bytes=mf.MAX_MANIFEST_BYTES,
    )
    content_type = fetched.headers.get("Content-Type", "") if fetched else ""
    if fetched is None or not content_type.startswith(mf.OCI_INDEX):
        # No referrers API upstream: fall back to the `<alg>-<hex>` tag schema.
        fetched = await client.fetch(
            "GET",
            repository,
            f"manifests/{subject.algorithm}-{subject.hex}",
            headers=headers,
            max_bytes=mf.MAX_MANIFEST_BYTES,
        )
    if fetched is None:
        return mf.empty_index()
    try:
        parsed = mf.parse(fetched.body)
        body = mf.filter_index(fetched.body, artifact_type)
    except (mf.ManifestInvalid, ValueError):
        raise UpstreamError("seed registry sent a malformed referrers index") from None
    tenancy.grant(client.upstream.ns, repository, parsed.manifests)
    return body
