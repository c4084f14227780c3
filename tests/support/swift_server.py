"""A real, single-node OpenStack Swift on 127.0.0.1 for the delivery tests (a pytest session fixture).

Debian 12's Swift 2.30 (packages swift, swift-proxy, swift-object, swift-container, swift-account,
python3-swiftclient, memcached; installed with apt-get if missing, without letting them start services)
runs as one replica on one device in a per-session temporary directory, with free ports, TempAuth
(``admin:admin``/``admin``), SLO, DLO, bulk and the S3 API (``s3api``, same port, access key
``admin:admin``, secret ``admin``).

Things that matter here, learnt the hard way:
* Debian's Swift lives in /usr/bin/python3's dist-packages, so the servers run under /usr/bin/python3 even
  though the tests run in the project's venv; only HTTP crosses between the two.
* Swift reads its hash prefix/suffix from the hard-coded /etc/swift/swift.conf. A small launcher points
  ``swift.common.utils.SWIFT_CONF_FILE`` at our own file before the storage policies load, so nothing under
  /etc/swift is used or touched.
* Without /dev/log Swift's syslog handler sends UDP to 127.0.0.1:514; the launcher swaps it for a null
  handler (the ``-v`` flag already copies the logs to stderr, which goes to a per-server log file).
* A Swift server's parent calls ``killpg(0, SIGTERM)`` when it stops; every process we start gets its own
  session, so that reaches only its own group, and the fixture stops exactly the groups it started.
* TempAuth keeps tokens in memcached: without it, auth answers 503.
* With a single device, one 507 makes the proxy error-limit the device for 60 s (every request 503);
  ``error_suppression_interval = 0`` turns that off.
* SLO deletes must be synchronous (``allow_async_delete = false``): no object-expirer runs here.
* SLO GETs are throttled to one segment a second after the tenth (``rate_limit_after_segment``); the
  tests cut objects into many small segments, so the limit is lifted.
* Object metadata lives in user xattrs (ext4: ~4 KiB per inode), so the data directory must support them.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

SYSTEM_PYTHON = "/usr/bin/python3"
DEB_PACKAGES = ["swift", "swift-proxy", "swift-object", "swift-container", "swift-account",
                "python3-swiftclient", "memcached"]
SERVERS = ("account", "container", "object", "proxy")
START_TIMEOUT = 60.0

_LAUNCHER = '''\
"""Run one Swift WSGI server in the foreground: launcher.py <swift.conf> <server-name> <server.conf> -v"""
import logging
import os
import sys

swift_conf, server = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
try:
    os.setsid()  # already a session leader when started by the fixture; harmless then
except OSError:
    pass

import swift.common.utils as utils
utils.SWIFT_CONF_FILE = swift_conf  # before swift.common.storage_policy is imported


class _NoSyslog(logging.NullHandler):
    def __init__(self, *args, **kwargs):
        logging.NullHandler.__init__(self)


for _name in ("swift.common.utils", "swift.common.utils.logs"):
    _mod = sys.modules.get(_name)
    if _mod is not None and hasattr(_mod, "ThreadSafeSysLogHandler"):
        _mod.ThreadSafeSysLogHandler = _NoSyslog

from swift.common import constraints, storage_policy
storage_policy.reload_storage_policies()
constraints.reload_constraints()
from swift.common.wsgi import run_wsgi

kwargs = {}
if server == "object-server":
    from swift.obj import server as obj_server
    kwargs["global_conf_callback"] = obj_server.global_conf_callback
conf_file, options = utils.parse_options()
options.update(kwargs)
sys.exit(run_wsgi(conf_file, server, **options))
'''

_RINGS = '''\
import sys
from swift.common.ring import RingBuilder
etc = sys.argv[1]
for name, port in zip(("account", "container", "object"), map(int, sys.argv[2:5])):
    b = RingBuilder(8, 1, 1)  # part power 8, one replica, min_part_hours 1
    b.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1", "port": port, "device": "d1",
               "weight": 100, "meta": ""})
    b.rebalance()
    b.get_ring().save("%s/%s.ring.gz" % (etc, name))
'''


@dataclasses.dataclass
class SwiftServer:
    base: Path
    proxy_port: int
    user: str = "admin:admin"
    key: str = "admin"

    @property
    def auth_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}/auth/v1.0"

    @property
    def storage_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}/v1/AUTH_admin"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def env(self) -> dict[str, str]:
        """Variables for clients: the ``swift`` CLI and ``SwiftSink`` (ST_*), boto3 (AWS_*)."""
        return {
            "ST_AUTH": self.auth_url, "ST_USER": self.user, "ST_KEY": self.key,
            "AWS_ACCESS_KEY_ID": self.user, "AWS_SECRET_ACCESS_KEY": self.key,
            "AWS_DEFAULT_REGION": "us-east-1", "S3_ENDPOINT_URL": self.s3_endpoint,
        }

    def connection(self, **kw: Any) -> Any:
        from swiftclient import client as sc

        return sc.Connection(authurl=self.auth_url, user=self.user, key=self.key, auth_version="1.0", **kw)

    def s3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.s3_endpoint, region_name="us-east-1", aws_access_key_id=self.user,
            aws_secret_access_key=self.key,
            config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"),
        )


def _ensure_packages() -> None:
    def missing() -> list[str]:
        out = []
        for p in DEB_PACKAGES:
            r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True)
            if "install ok installed" not in r.stdout:
                out.append(p)
        return out

    todo = missing()
    if not todo:
        return
    # Keep the packages' post-install scripts from starting swift/memcached services on the host.
    made_policy = False
    if not os.path.exists("/usr/sbin/policy-rc.d"):
        Path("/usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
        os.chmod("/usr/sbin/policy-rc.d", 0o755)
        made_policy = True
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *todo]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get install {' '.join(todo)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    finally:
        if made_policy:
            os.unlink("/usr/sbin/policy-rc.d")


def _free_ports(n: int) -> list[int]:
    # SO_REUSEADDR as Swift uses it, so a port in TIME_WAIT counts as free; all held until all are chosen.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _write_configs(base: Path, ports: dict[str, int]) -> None:
    etc = base / "etc"
    (etc / "swift.conf").write_text(textwrap.dedent("""\
        [swift-hash]
        swift_hash_path_prefix = vhdcore-tests
        swift_hash_path_suffix = vhdcore-tests

        [storage-policy:0]
        name = Policy-0
        default = yes
        """))
    user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name

    def default(port: int) -> str:
        return textwrap.dedent(f"""\
            [DEFAULT]
            bind_ip = 127.0.0.1
            bind_port = {port}
            workers = 0
            user = {user}
            swift_dir = {etc}
            devices = {base / 'srv'}
            mount_check = false
            disable_fallocate = true
            log_level = INFO
            bind_timeout = 10
            """)

    for s in ("account", "container", "object"):
        (etc / f"{s}-server.conf").write_text(default(ports[s]) + textwrap.dedent(f"""
            [pipeline:main]
            pipeline = healthcheck {s}-server

            [app:{s}-server]
            use = egg:swift#{s}

            [filter:healthcheck]
            use = egg:swift#healthcheck
            """))
    (etc / "proxy-server.conf").write_text(default(ports["proxy"]) + textwrap.dedent(f"""
        [pipeline:main]
        pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk s3api tempauth copy slo dlo proxy-logging proxy-server

        [app:proxy-server]
        use = egg:swift#proxy
        account_autocreate = true
        allow_account_management = true
        error_suppression_interval = 0

        [filter:tempauth]
        use = egg:swift#tempauth
        user_admin_admin = admin .admin .reseller_admin
        user_test_tester = testing .admin
        token_life = 86400

        [filter:cache]
        use = egg:swift#memcache
        memcache_servers = 127.0.0.1:{ports['memcached']}

        [filter:catch_errors]
        use = egg:swift#catch_errors
        [filter:gatekeeper]
        use = egg:swift#gatekeeper
        [filter:healthcheck]
        use = egg:swift#healthcheck
        [filter:proxy-logging]
        use = egg:swift#proxy_logging
        [filter:listing_formats]
        use = egg:swift#listing_formats
        [filter:bulk]
        use = egg:swift#bulk
        [filter:s3api]
        use = egg:swift#s3api
        location = us-east-1
        [filter:copy]
        use = egg:swift#copy
        [filter:slo]
        use = egg:swift#slo
        allow_async_delete = false
        # Swift serves an SLO's segments past the 10th at one per second by default: a 25-segment test
        # object would take 15 s to read back. Tests use many small segments, so lift the limit.
        rate_limit_after_segment = 100000
        [filter:dlo]
        use = egg:swift#dlo
        """))


def _auth_ok(server: SwiftServer) -> bool:
    req = urllib.request.Request(server.auth_url, headers={"X-Auth-User": server.user, "X-Auth-Key": server.key})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            token, url = r.headers.get("X-Auth-Token"), r.headers.get("X-Storage-Url")
        req = urllib.request.Request(url, method="HEAD", headers={"X-Auth-Token": token})
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status in (200, 204)
    except Exception:
        return False


class _Processes:
    """The processes this fixture started, each the leader of its own process group."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], log: Path) -> None:
        with open(log, "ab") as out:
            self.procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)  # the group is ours: start_new_session made p its leader
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        self.procs.clear()


def start_swift(base: Path) -> tuple[SwiftServer, _Processes]:
    _ensure_packages()
    for d in ("etc", "srv/d1", "log", "bin"):
        (base / d).mkdir(parents=True, exist_ok=True)
    probe = base / "srv" / "d1" / "xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.swift.metadata", b"x" * 254)
    except OSError as exc:
        raise RuntimeError(f"{base} does not support user xattrs, which Swift needs: {exc}") from None
    finally:
        probe.unlink()

    names = ("proxy", "account", "container", "object", "memcached")
    ports = dict(zip(names, _free_ports(len(names))))
    _write_configs(base, ports)
    launcher = base / "bin" / "launcher.py"
    launcher.write_text(_LAUNCHER)
    rings = base / "bin" / "rings.py"
    rings.write_text(_RINGS)
    subprocess.run([SYSTEM_PYTHON, str(rings), str(base / "etc"),
                    str(ports["account"]), str(ports["container"]), str(ports["object"])],
                   check=True, capture_output=True)

    procs = _Processes()
    server = SwiftServer(base=base, proxy_port=ports["proxy"])
    try:
        memcached = shutil.which("memcached") or "/usr/bin/memcached"
        user = __import__("pwd").getpwuid(os.getuid()).pw_name
        procs.start("memcached", [memcached, "-l", "127.0.0.1", "-p", str(ports["memcached"]), "-U", "0",
                                  "-m", "64", "-c", "1024", "-u", user], base / "log" / "memcached.log")
        for s in SERVERS:
            procs.start(s, [SYSTEM_PYTHON, str(launcher), str(base / "etc" / "swift.conf"), f"{s}-server",
                            str(base / "etc" / f"{s}-server.conf"), "-v"], base / "log" / f"{s}-server.log")
        deadline = time.monotonic() + START_TIMEOUT
        while not _auth_ok(server):
            dead = procs.dead()
            if dead or time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:])
                    for f in sorted((base / "log").glob("*.log"))
                )
                why = f"{', '.join(dead)} exited" if dead else f"not ready after {START_TIMEOUT:.0f} s"
                raise RuntimeError(f"Swift did not start ({why}):\n{logs}")
            time.sleep(0.1)
    except BaseException:
        procs.stop()
        raise
    return server, procs


@pytest.fixture(scope="session")
def swift_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwiftServer]:
    """A running Swift (proxy with tempauth/SLO/s3api + account/container/object servers + memcached)."""
    base = tmp_path_factory.mktemp("swift")
    server, procs = start_swift(base)
    try:
        yield server
    finally:
        procs.stop()


if __name__ == "__main__":  # manual use: python tests/swift_server.py [base-dir]; Ctrl-C stops it
    import tempfile

    where = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="vhdcore-swift-"))
    srv, ps = start_swift(where)
    print("\n".join(f"{k}={v}" for k, v in srv.env.items()), flush=True)

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` and friends send SIGTERM: still stop the servers
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        ps.stop()
