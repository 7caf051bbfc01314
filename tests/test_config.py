import dataclasses
from pathlib import Path

import pytest

from p2preg.cli import build_parser
from p2preg.core.config import ConfigError, HostPort, load, parse_size
from p2preg.node.cli import config_from_args
from p2preg.node.config import NodeConfig, Upstream


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text(
        'upstream = ["docker.io=https://registry-1.docker.io"]\n'
        'listen = "127.0.0.1:7000"\ntag_ttl_s = 5\nstore-max-bytes = "1GiB"\n'
    )
    env = {"P2PREG_LISTEN": "127.0.0.1:7001", "P2PREG_TAG_TTL_S": "7", "HOME": "/x"}
    c = load(NodeConfig, cli={"listen": "0.0.0.0:7002", "insecure": True}, env=env, file=f)
    assert c.listen == HostPort("0.0.0.0", 7002)
    assert c.tag_ttl_s == 7.0
    assert load(NodeConfig, file=f).tag_ttl_s == 5.0  # a TOML integer for a float
    assert c.store_max_bytes == 1024**3
    assert c.upstream == (Upstream("docker.io", "https://registry-1.docker.io"),)
    assert c.upstream_for(None) is c.upstream[0]
    assert c.upstream_for("docker.io") is c.upstream[0]
    assert c.upstream_for("ghcr.io") is None


def test_tracker_and_trackers_are_one_setting(tmp_path: Path) -> None:
    """The single-URL form and the list are one setting: the source of higher
    precedence that gives either wins; one source giving both is an error."""
    one, two, three = "http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"
    up = {"upstream": ["http://a"]}
    f = tmp_path / "node.toml"
    f.write_text(f'trackers = ["{one}", "{two}"]\n')
    assert load(NodeConfig, cli=up, file=f).tracker_urls == (one, two)
    assert load(NodeConfig, cli={**up, "tracker": three}, file=f).tracker_urls == (three,)
    env = {"P2PREG_TRACKERS": f"{three},{one}"}
    assert load(NodeConfig, cli=up, env=env, file=f).tracker_urls == (three, one)
    f.write_text(f'tracker = "{one}"\n')
    assert load(NodeConfig, cli={**up, "trackers": [two, three]}, file=f).tracker_urls == (
        two, three,
    )
    assert load(NodeConfig, cli=up, file=f).tracker_urls == (one,)
    assert load(NodeConfig, cli=up).tracker_urls == ()
    f.write_text(f'tracker = "{one}"\ntrackers = ["{two}"]\n')
    with pytest.raises(ConfigError, match="give tracker or trackers, not both"):
        load(NodeConfig, cli=up, file=f)


def test_defaults_are_safe_for_a_node_local_endpoint() -> None:
    c = load(NodeConfig, cli={"upstream": ["http://127.0.0.1:5001"]})
    assert c.listen == HostPort("127.0.0.1", 5000)
    assert c.upstream[0].ns == "127.0.0.1:5001"


def test_the_cluster_fallback_is_on_unless_switched_off() -> None:
    assert load(NodeConfig, cli={"upstream": ["http://a"]}).cluster_fallback is True
    env = {"P2PREG_CLUSTER_FALLBACK": "false"}
    assert load(NodeConfig, cli={"upstream": ["http://a"]}, env=env).cluster_fallback is False
    args = build_parser("node").parse_args(
        ["node", "--upstream", "http://a", "--no-cluster-fallback"]
    )
    assert config_from_args(args).cluster_fallback is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cli": {}}, "at least one --upstream"),
        ({"cli": {"upstream": ["ftp://x"]}}, "upstream URL"),
        ({"cli": {"upstream": ["http://a", "http://a"]}}, "share one registry name"),
        ({"cli": {"upstream": ["http://a"], "listen": "nope"}}, "HOST:PORT"),
        ({"cli": {"upstream": ["http://a"], "trackers": ["http://t:1", "ftp://t:2"]}},
         "takes a base URL"),
        ({"cli": {"upstream": ["http://a"], "trackers": ["http://t:1", "https://t:2"]}},
         "mix http and https"),
        ({"cli": {"upstream": ["http://a"], "trackers": ["http://t:1", "http://t:1/"]}},
         "given twice"),
        ({"cli": {"upstream": ["http://a"], "tag_ttl_s": "soon"}}, "expected a number"),
        ({"cli": {"upstream": ["http://a"], "tracker": "http://t:1/announce"}}, "base URL"),
        ({"cli": {"upstream": ["http://a"]}, "env": {"P2PREG_NOPE": "1"}}, "P2PREG_NOPE"),
        ({"cli": {"upstream": ["http://a"], "credentials": ["bad"]}}, "NS=USER:PASSWORD"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(NodeConfig, **kwargs)  # type: ignore[arg-type]


def test_unknown_file_key_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('upstream = ["http://a"]\nlisten_adress = "x:1"\n')
    with pytest.raises(ConfigError, match="listen_adress"):
        load(NodeConfig, file=f)
    f.write_text("not toml [")
    with pytest.raises(ConfigError, match=r"c\.toml"):
        load(NodeConfig, file=f)


def test_credentials_are_not_in_repr() -> None:
    c = load(NodeConfig, cli={"upstream": ["r=http://a"], "credentials": ["r=alice:s3cret"]})
    cred = c.credential_for("r")
    assert cred is not None and (cred.username, cred.password) == ("alice", "s3cret")
    assert "s3cret" not in repr(c)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1024", 1024), ("1KiB", 1024), ("2MiB", 2 << 20), ("3G", 3 * 10**9), ("5 GiB", 5 << 30)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_the_component_key_table_matches_every_component() -> None:
    from p2preg.core.config import COMPONENT_KEYS
    from tracker.config import TrackerConfig

    assert {
        "node": frozenset(f.name for f in dataclasses.fields(NodeConfig)),
        "tracker": frozenset(f.name for f in dataclasses.fields(TrackerConfig)),
    } == COMPONENT_KEYS


def test_tls_dir_is_checked_and_names_the_bad_file(tmp_path: Path) -> None:
    from p2preg.core.pki import Identity, issue, make_ca
    from tracker.config import TrackerConfig

    ca = make_ca("test")
    for role in ("node", "tracker"):
        d = tmp_path / role
        d.mkdir(mode=0o700)
        leaf = issue(ca, Identity("test", role, "x"))
        (d / "tls.crt").write_bytes(leaf.cert_pem)
        (d / "tls.key").write_bytes(leaf.key_pem)
        (d / "ca.crt").write_bytes(ca.cert_pem)
    node_env = {"P2PREG_TLS_DIR": str(tmp_path / "node"), "P2PREG_UPSTREAM": "http://a"}
    node = load(NodeConfig, env=node_env)
    assert node.tls_dir == tmp_path / "node" and node.insecure is False
    tracker = load(TrackerConfig, cli={"tls_dir": str(tmp_path / "tracker")})
    assert tracker.tls_dir == tmp_path / "tracker"
    assert load(TrackerConfig, env={"P2PREG_INSECURE": "true"}).insecure is True

    # The node reads its files when it starts serving (containerd-config reads the
    # same config for its upstreams, without the certificate).
    wrong = load(NodeConfig, env={**node_env, "P2PREG_TLS_DIR": str(tmp_path / "tracker")})
    with pytest.raises(ConfigError, match=r"a tracker certificate .* this node needs a node"):
        wrong.check_serving()
    with pytest.raises(ConfigError, match="give tls_dir or insecure, not both"):
        load(NodeConfig, env=node_env, cli={"insecure": True})
    (tmp_path / "tracker" / "tls.key").unlink()
    with pytest.raises(ConfigError, match=r"tracker/tls\.key: no such file"):
        load(TrackerConfig, cli={"tls_dir": str(tmp_path / "tracker")})


@pytest.mark.parametrize(
    ("component", "env", "message"),
    [
        ("node", {"P2PREG_TRACKER_TOKEN": ""}, "tracker_token is empty"),
        ("node", {"P2PREG_TRACKER_TOKEN": "  "}, "tracker_token is empty"),
        ("node", {"P2PREG_ADMIN_TOKEN_FILE": ""}, "admin_token_file is empty"),
        ("tracker", {"P2PREG_TOKEN": ""}, "token is empty"),
        ("tracker", {"P2PREG_TOKEN_FILE": ""}, "token_file is empty"),
    ],
)
def test_an_empty_secret_is_an_error_not_auth_off(
    component: str, env: dict[str, str], message: str
) -> None:
    from tracker.config import TrackerConfig

    cls: type = NodeConfig if component == "node" else TrackerConfig
    cli = {"upstream": ["http://a"]} if component == "node" else {}
    with pytest.raises(ConfigError, match=message):
        load(cls, cli=cli, env=env)


def test_an_empty_token_file_stops_node_and_tracker(tmp_path: Path) -> None:
    from tracker.config import TrackerConfig

    empty = tmp_path / "token"
    empty.write_text("\n")
    node = load(NodeConfig, cli={"upstream": ["http://a"], "tracker_token_file": str(empty)})
    with pytest.raises(ConfigError, match="is empty"):
        node.resolved_tracker_token()
    tracker = load(TrackerConfig, cli={"token_file": str(empty)})
    with pytest.raises(ConfigError, match="is empty"):
        tracker.resolved_token()
    with pytest.raises(ConfigError, match="NS=USER:PASSWORD"):
        load(NodeConfig, cli={"upstream": ["r=http://a"], "credentials": ["r=alice:"]})
