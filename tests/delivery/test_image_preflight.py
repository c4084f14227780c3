"""`vhdcore image` to a real Swift: the preflight refuses bad credentials and a missing container before any
work, with every source layer byte-identical; the `swift` CLI's ways to authenticate are accepted."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.swift_server import SwiftServer

from vhdcore.pipeline import image
from vhdcore.delivery.upload import UploadError
from vhdcore.delivery.upload.swift import swift_auth
from support.vhdtest import MiB, build_chain, disk_sha256, file_sha256

pytestmark = pytest.mark.backend_independent

_AUTH_VARS = [k for k in os.environ if k.startswith(("ST_", "OS_"))]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _AUTH_VARS}
    env.update(extra)
    return env


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdcore", *args], capture_output=True, text=True, env=env)


@pytest.fixture
def chain(tmp_path: Path) -> list[Path]:
    paths, _ = build_chain(tmp_path, 3, size=2 * MiB, writes=10)
    return paths


def _hashes(paths: list[Path]) -> list[str]:
    return [file_sha256(p) for p in paths]


def _objects(server: SwiftServer, container: str) -> list[str]:
    from swiftclient.exceptions import ClientException

    try:
        return [o["name"] for o in server.connection().get_container(container, full_listing=True)[1]]
    except ClientException as exc:
        if exc.http_status == 404:
            return []
        raise


def test_bad_credentials_refused_before_any_work(swift_server: SwiftServer, chain: list[Path]) -> None:
    before = _hashes(chain)
    r = _cli(["image", str(chain[-1]), "swift://pre-bad/img.vhd", "--coalesce-in-place", "--no-growth",
              "-A", swift_server.auth_url, "-U", swift_server.user, "-K", "wrong"], _clean_env())
    assert r.returncode == 1, r.stderr
    assert "authentication failed" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert _hashes(chain) == before
    assert _objects(swift_server, "pre-bad") == []


def test_missing_container_refused_when_it_may_not_be_created(swift_server: SwiftServer,
                                                              chain: list[Path]) -> None:
    before = _hashes(chain)
    with pytest.raises(UploadError) as ei:
        image(chain[-1], "swift://pre-missing/img.vhd", analyse=False, coalesce_in_place=True,
              create_container=False, auth_url=swift_server.auth_url, user=swift_server.user, key=swift_server.key)
    assert ei.value.field == "container" and "does not exist" in str(ei.value)
    assert _hashes(chain) == before


def test_swift_cli_options_and_token_variables(swift_server: SwiftServer, chain: list[Path]) -> None:
    content = disk_sha256(chain[-1])
    before = _hashes(chain)
    r = _cli(["image", str(chain[-1]), "swift://pre-ok/a.vhd", "--no-growth", "-A", swift_server.auth_url,
              "-U", swift_server.user, "-K", swift_server.key], _clean_env())
    assert r.returncode == 0, r.stderr
    url, token = swift_server.connection().get_auth()
    r = _cli(["image", str(chain[-1]), "swift://pre-ok/b.vhd", "--no-growth", "--coalesce-in-place"],
             _clean_env(OS_STORAGE_URL=url, OS_AUTH_TOKEN=token))
    assert r.returncode == 0, r.stderr
    assert file_sha256(chain[0]) != before[0] and not chain[1].exists()  # the merge ran, after the delivery
    assert disk_sha256(chain[0]) == content
    conn = swift_server.connection()
    for name in ("a.vhd", "b.vhd"):
        assert conn.head_object("pre-ok", name)["content-length"]


def test_keystone_variables_reach_swiftclient(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in _AUTH_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OS_AUTH_URL", "https://keystone.example/v3")
    monkeypatch.setenv("OS_USERNAME", "u")
    monkeypatch.setenv("OS_PASSWORD", "p")
    monkeypatch.setenv("OS_PROJECT_NAME", "proj")
    monkeypatch.setenv("OS_USER_DOMAIN_NAME", "Default")
    monkeypatch.setenv("OS_PROJECT_DOMAIN_NAME", "Default")
    monkeypatch.setenv("OS_REGION_NAME", "RegionOne")
    a = swift_auth()
    assert (a["authurl"], a["user"], a["key"], a["auth_version"]) == ("https://keystone.example/v3", "u", "p", "3")
    assert a["os_options"] == {"project_name": "proj", "user_domain_name": "Default",
                               "project_domain_name": "Default", "region_name": "RegionOne"}
    # the CLI's -A/-U/-K win over the environment, and mean TempAuth v1 as in the swift CLI
    a = swift_auth("http://x/auth/v1.0", "acc:usr", "k")
    assert (a["authurl"], a["user"], a["key"], a["auth_version"]) == ("http://x/auth/v1.0", "acc:usr", "k", "1.0")
    from swiftclient import client as sc

    sc.Connection(**a)  # every argument is one swiftclient's Connection takes


def test_s3_bad_credentials_and_missing_bucket(swift_server: SwiftServer, chain: list[Path]) -> None:
    """The same preflight through Swift's S3 API, with the real boto3 client the upload uses."""
    before = _hashes(chain)
    s3 = dict(endpoint_url=swift_server.s3_endpoint, region="us-east-1", access_key=swift_server.user)
    with pytest.raises(UploadError) as ei:
        image(chain[-1], "s3://pre-s3/img.vhd", analyse=False, coalesce_in_place=True, secret_key="wrong", **s3)
    assert ei.value.field == "auth", str(ei.value)
    with pytest.raises(UploadError) as ei:
        image(chain[-1], "s3://pre-s3-missing/img.vhd", analyse=False, coalesce_in_place=True,
              secret_key=swift_server.key, **s3)
    assert ei.value.field == "bucket" and "does not exist" in str(ei.value)
    assert _hashes(chain) == before
