"""p2preg.node.hypercorn_internals: the fence around hypercorn's and Quart's internals.

The tables below are what the fence was written against (hypercorn 0.18.0,
Quart 0.22.0, quart-trio 0.12.0): the signature of every internal method or
class it patches, overrides, calls or constructs; the attributes it reads on
hypercorn's and Quart's objects; the calls it relies on them making. After an
upgrade, each one that moved fails under its own name; docs/HYPERCORN.md says
what to do then. The other tests hold the fence shut: no other node module
imports an internal, the pins agree, and a version the fence was not checked
against stops `serve_node` and the `p2preg node` process before they bind.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import trio

from harness.procs import clean_env, free_port
from p2preg.core.config import ConfigError, HostPort
from p2preg.node import hypercorn_internals
from p2preg.node.config import NodeConfig, Upstream
from p2preg.node.server import serve_node

ROOT = Path(__file__).resolve().parent.parent
FENCE = ROOT / "p2preg" / "node" / "hypercorn_internals.py"

SIGNATURES = {
    # hypercorn: patched
    "hypercorn.protocol.http_stream.HTTPStream.handle": "(self, event: 'Event') -> 'None'",
    "hypercorn.protocol.http_stream.HTTPStream.app_send":
        "(self, message: 'ASGISendEvent | None') -> 'None'",
    "hypercorn.protocol.h11.H11Protocol._send_h11_event":
        "(self, event: 'H11SendableEvent') -> 'None'",
    "hypercorn.trio.tcp_server.TCPServer.protocol_send": "(self, event: 'Event') -> 'None'",
    "hypercorn.trio.tcp_server.TCPServer.run": "(self) -> 'None'",
    # hypercorn: overridden
    "hypercorn.config.Config.create_sockets": "(self) -> 'Sockets'",
    # hypercorn: called or constructed
    "hypercorn.protocol.http_stream.HTTPStream._send_closed": "(self) -> 'None'",
    "hypercorn.protocol.ProtocolWrapper.handle": "(self, event: 'Event') -> 'None'",
    "hypercorn.protocol.events.Body": "(stream_id: 'int', data: 'bytes') -> None",
    "hypercorn.protocol.events.Request": (
        "(stream_id: 'int', headers: 'list[tuple[bytes, bytes]]', http_version: 'str', "
        "method: 'str', raw_path: 'bytes', state: 'ConnectionState') -> None"
    ),
    "hypercorn.events.Closed": "() -> None",
    "hypercorn.events.RawData":
        "(data: 'bytes', address: 'tuple[str, int] | None' = None) -> None",
    "hypercorn.utils.UnexpectedMessageError": "(state: 'Enum', message_type: 'str') -> 'None'",
    "hypercorn.utils.suppress_body": "(method: 'str', status_code: 'int') -> 'bool'",
    "hypercorn.protocol.http_stream.ASGIHTTPState.RESPONSE": None,  # exists; an enum member
    "hypercorn.config.Sockets": None,  # exists; read for its socket lists
    # Quart: overridden, and called
    "quart.asgi.ASGIHTTPConnection._send_response":
        "(self, send: 'ASGISendCallable', response: 'ResponseTypes') -> 'None'",
    "quart.utils.encode_headers": "(headers: 'Headers') -> 'list[tuple[bytes, bytes]]'",
    "quart_trio.asgi.TrioASGIHTTPConnection": None,  # exists; the class we subclass
}  # fmt: skip

# Attributes the fence reads or sets on objects of these classes: each must
# still be assigned (or declared) somewhere in the class.
ATTRIBUTES = {
    "hypercorn.protocol.http_stream.HTTPStream":
        {"send", "scope", "state", "response", "stream_id", "closed"},
    "hypercorn.protocol.h11.H11Protocol": {"send", "ssl", "connection"},
    "hypercorn.trio.tcp_server.TCPServer": {"send_lock", "stream", "protocol"},
    "hypercorn.config.Sockets": {"secure_sockets", "insecure_sockets"},
    "quart.asgi.ASGIHTTPConnection": {"scope"},
}  # fmt: skip

# Calls the fence relies on the library making: without them an override is
# silently never used.
CALLS = {
    # ZeroCopyConnection overrides _send_response: quart-trio must still call it.
    "quart_trio.asgi.TrioASGIHTTPConnection.handle_request": "_send_response",
    # ListeningConfig overrides create_sockets: serve's worker must still call it.
    "hypercorn.trio.run.worker_serve": "create_sockets",
}

# What the node may import from these libraries outside the fence: their public API.
PUBLIC = {
    "hypercorn.config": {"Config"},
    "hypercorn.trio": {"serve"},
    "quart": {"*"},
    "quart_trio": {"*"},
    "quart.wrappers.response": {"ResponseBody"},  # the type of Response's body
}
LIBRARIES = ("hypercorn", "quart", "quart_trio")


def _resolve(name: str) -> object:
    """The object `name` names, as the library defines it (not as `install()` patched it)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        owner = obj
        for attribute in parts[i:]:
            owner, obj = obj, getattr(obj, attribute)
        for patched, method, original, _ in hypercorn_internals._PATCHES:
            if (patched, method) == (owner, parts[-1]):
                return original
        return obj
    raise ImportError(name)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_every_internal_touched_keeps_the_signature_it_was_written_for(name: str) -> None:
    try:
        obj = _resolve(name)
    except (ImportError, AttributeError):
        pytest.fail(f"{name} is gone: p2preg/node/hypercorn_internals.py touches it")
    want = SIGNATURES[name]
    if want is not None:
        got = str(inspect.signature(obj))  # type: ignore[arg-type]
        assert got == want, f"{name} moved: written for {want}, now {got}"


def _assigned_attributes(cls: type) -> set[str]:
    """Fields declared in the class body, and `self.x` assigned or declared in any method."""
    names = set()
    for klass in cls.__mro__[:-1]:
        (tree,) = ast.parse(textwrap.dedent(inspect.getsource(klass))).body
        assert isinstance(tree, ast.ClassDef)
        for statement in tree.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                names.add(statement.target.id)
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == "self"
                ):
                    names.add(target.attr)
    return names


@pytest.mark.parametrize("name", sorted(ATTRIBUTES))
def test_the_attributes_read_are_still_there(name: str) -> None:
    cls = _resolve(name)
    assert isinstance(cls, type)
    missing = ATTRIBUTES[name] - _assigned_attributes(cls)
    assert not missing, f"{name} no longer sets {sorted(missing)}, which the fence reads"


@pytest.mark.parametrize("name", sorted(CALLS))
def test_the_overridden_methods_are_still_called(name: str) -> None:
    function = _resolve(name)
    code = function.__code__  # type: ignore[attr-defined]
    assert CALLS[name] in code.co_names, f"{name} no longer calls {CALLS[name]}"


def _library_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every import of hypercorn, quart or quart_trio in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return [(m, n) for m, n in found if m.split(".")[0] in LIBRARIES]


def test_every_library_name_the_fence_imports_is_in_the_table() -> None:
    checked = set(SIGNATURES) | set(ATTRIBUTES) | set(CALLS)
    for module, name in _library_imports(FENCE):
        full = f"{module}.{name}"
        covered = any(c == full or c.startswith(full + ".") for c in checked)
        public = name in PUBLIC.get(module, ())
        assert covered or public, f"the fence imports {full}: add it to this file's tables"


def test_no_other_node_module_imports_an_internal() -> None:
    for path in sorted((ROOT / "p2preg").rglob("*.py")):
        if path == FENCE:
            continue
        for module, name in _library_imports(path):
            allowed = PUBLIC.get(module, set())
            assert "*" in allowed or name in allowed, (
                f"{path.relative_to(ROOT)} imports {module}.{name}: internals belong in "
                "p2preg/node/hypercorn_internals.py"
            )


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for line in requirements:
        name, sep, version = line.strip().partition("==")
        if sep:
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_pyproject_and_constraints_pin_the_checked_versions() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    in_pyproject = _pins(project["dependencies"])
    in_constraints = _pins((ROOT / "constraints.txt").read_text().splitlines())
    for name, version in hypercorn_internals.CHECKED_VERSIONS.items():
        assert in_pyproject.get(name) == version, f"pyproject.toml: want {name}=={version}"
        assert in_constraints.get(name) == version, f"constraints.txt: want {name}=={version}"
    assert hypercorn_internals.installed_versions() == dict(hypercorn_internals.CHECKED_VERSIONS)


def test_check_versions_names_each_version_it_was_not_checked_against() -> None:
    checked = dict(hypercorn_internals.CHECKED_VERSIONS)
    hypercorn_internals.check_versions(checked)
    with pytest.raises(ConfigError) as refused:
        hypercorn_internals.check_versions({**checked, "hypercorn": "0.19.0", "quart": "0.23.1"})
    message = str(refused.value)
    assert "\n" not in message
    assert "hypercorn 0.19.0, quart 0.23.1 installed" in message
    assert "hypercorn==0.18.0, quart==0.22.0 only" in message
    assert "quart-trio" not in message


def _patchable() -> dict[str, object]:
    return {name: getattr(owner, name) for owner, name, _, _ in hypercorn_internals._PATCHES}


def _installed_as(**versions: str) -> dict[str, str]:
    return {**hypercorn_internals.CHECKED_VERSIONS, **versions}


def test_install_refuses_an_unchecked_version_and_patches_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # hypercorn as it was before any `install()`; monkeypatch restores the rest.
    monkeypatch.setattr(hypercorn_internals, "_installed", False)
    for owner, name, original, _ in hypercorn_internals._PATCHES:
        monkeypatch.setattr(owner, name, original)
    before = _patchable()

    wrong = _installed_as(**{"quart-trio": "0.13.0"})
    monkeypatch.setattr(hypercorn_internals, "installed_versions", lambda: wrong)
    with pytest.raises(ConfigError, match=r"quart-trio 0\.13\.0 installed"):
        hypercorn_internals.install()
    assert _patchable() == before

    monkeypatch.setattr(hypercorn_internals, "installed_versions", _installed_as)
    hypercorn_internals.install()
    assert all(_patchable()[name] is not method for name, method in before.items())


async def test_serve_node_refuses_an_unchecked_hypercorn_before_binding(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hypercorn_internals.install()  # installed earlier in the process: still refused
    wrong = _installed_as(hypercorn="0.19.0")
    monkeypatch.setattr(hypercorn_internals, "installed_versions", lambda: wrong)
    config = NodeConfig(
        listen=HostPort("127.0.0.1", 0),
        upstream=(Upstream("seed.test", "http://127.0.0.1:9"),),
        data_dir=tmp_path / "data",
    )
    with trio.fail_after(30), pytest.raises(ConfigError, match=r"hypercorn 0\.19\.0 installed"):
        await serve_node(config)
    assert not config.data_dir.exists()


def test_the_node_process_refuses_an_unchecked_hypercorn_in_one_line(tmp_path: Path) -> None:
    # Metadata of hypercorn 0.19.0 ahead of the real one on the path: what
    # `importlib.metadata` would report after an upgrade.
    shadow = tmp_path / "shadow" / "hypercorn-0.19.0.dist-info"
    shadow.mkdir(parents=True)
    (shadow / "METADATA").write_text("Metadata-Version: 2.1\nName: hypercorn\nVersion: 0.19.0\n")
    env = clean_env(drop_prefixes=["P2PREG_"], PYTHONPATH=f"{shadow.parent}:{ROOT}")
    data_dir = tmp_path / "data"
    argv = [sys.executable, "-m", "p2preg", "node", "--listen", f"127.0.0.1:{free_port()}"]
    argv += ["--data-dir", str(data_dir), "--upstream", "seed.test=http://127.0.0.1:9"]
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("p2preg node: refusing to start: hypercorn 0.19.0 installed"), last
    assert "Traceback" not in done.stderr
    assert not data_dir.exists()
