"""pytest fixtures over the harness: real registries, containerd, test images.

Everything here is synchronous and function-scoped unless building it is both
slow and read-only afterwards (the image layouts are built once per session).
Each fixture stops what it started, in reverse order, when its test ends.
Tests that use these fixtures mark themselves `@pytest.mark.integration`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Literal, Protocol

import pytest

from harness.containerd import Containerd, Snapshotter, open_containerd
from harness.images import OciLayout, PushedImage, PushFormat, build_image, build_index
from harness.node import NodeProcess, open_node
from harness.registry import Registry, TokenAuth, open_registry
from harness.skopeo import push
from tests.fixtures.token_issuer import TokenIssuer, open_token_issuer

ImageVariant = Literal["single", "index"]
MakeNode = Callable[..., NodeProcess]


class PushImage(Protocol):
    def __call__(
        self,
        registry: Registry,
        variant: ImageVariant = "single",
        repository: str | None = None,
        *,
        format: PushFormat = "oci",
        creds: str | None = None,
    ) -> PushedImage: ...


@pytest.fixture(scope="session")
def image_layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[ImageVariant, OciLayout]:
    """OCI layouts built once: `single` (linux/amd64) and `index` (amd64 + arm64)."""
    base = tmp_path_factory.mktemp("images")
    return {
        "single": build_image(base / "single", seed="single", layer_sizes=(48 * 1024, 300 * 1024)),
        "index": build_index(base / "index", seed="index", layer_sizes=(32 * 1024, 200 * 1024)),
    }


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    """`make(token_auth=None) -> Registry`; every one made is stopped at teardown."""
    counter = itertools.count()
    with ExitStack() as stack:

        def make(*, token_auth: TokenAuth | None = None) -> Registry:
            workdir = tmp_path / f"registry-{next(counter)}"
            return stack.enter_context(open_registry(workdir, token_auth=token_auth))

        yield make


@pytest.fixture
def registry(registry_factory: Callable[..., Registry]) -> Registry:
    """A plain docker-registry, no auth."""
    return registry_factory()


@pytest.fixture
def token_issuer(tmp_path: Path) -> Iterator[TokenIssuer]:
    """Issuer with user `alice`/`secret`; anonymous callers get a token granting nothing."""
    with open_token_issuer(tmp_path / "token-issuer") as issuer:
        yield issuer


@pytest.fixture
def token_registry(
    registry_factory: Callable[..., Registry], token_issuer: TokenIssuer
) -> Registry:
    """A docker-registry behind `token_issuer`'s token auth."""
    return registry_factory(token_auth=token_issuer.auth)


@pytest.fixture
def push_image(image_layouts: dict[ImageVariant, OciLayout]) -> PushImage:
    """`push_image(registry, "single"|"index", repository=None, format=, creds=)`."""
    counter = itertools.count()

    def do_push(
        registry: Registry,
        variant: ImageVariant = "single",
        repository: str | None = None,
        *,
        format: PushFormat = "oci",
        creds: str | None = None,
    ) -> PushedImage:
        repo = repository or f"test/{variant}-{format}-{next(counter)}"
        return push(image_layouts[variant], registry.host, repo, format=format, creds=creds)

    return do_push


@pytest.fixture
def containerd_factory(tmp_path: Path) -> Iterator[Callable[..., Containerd]]:
    """`make(snapshotter="native", cri=False, cri_hosts_dir=None) -> Containerd`; several may
    run side by side. `cri` enables kubelet's image service (see `open_containerd`)."""
    counter = itertools.count()
    with ExitStack() as stack:

        def make(
            *, snapshotter: Snapshotter = "native", cri: bool = False,
            cri_hosts_dir: Path | None = None,
        ) -> Containerd:
            workdir = tmp_path / f"containerd-{next(counter)}"
            return stack.enter_context(open_containerd(
                workdir, snapshotter=snapshotter, cri=cri, cri_hosts_dir=cri_hosts_dir
            ))

        yield make


@pytest.fixture
def containerd(containerd_factory: Callable[..., Containerd]) -> Containerd:
    """A private containerd with the `native` snapshotter."""
    return containerd_factory()


@pytest.fixture
def hosts_dir(tmp_path: Path) -> Path:
    """An empty directory for `write_hosts_toml` / `ctr --hosts-dir`."""
    d = tmp_path / "hosts.d"
    d.mkdir()
    return d


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[MakeNode]:
    """`make_node(*upstreams, args=(), name="node")`; each one is stopped at teardown."""
    with ExitStack() as stack:

        def make(*upstreams: str, args: tuple[str, ...] = (), name: str = "node") -> NodeProcess:
            return stack.enter_context(open_node(tmp_path / name, upstreams, args=args, name=name))

        yield make
