"""docs/json.md is the contract for every command's --json output; this test reads it and holds every command to it:
the documented keys, the same key for the same role, sizes in bytes, times ISO 8601 UTC, warnings a list, errors
as a JSON object. `map --output=json` against qemu-img itself on fixed and dynamic disks."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vhdcore
from support.jsondoc import check_rules, documented_keys
from support.vhdtest import MiB, build_chain

pytestmark = pytest.mark.backend_independent

def cli(*args, cwd: Path, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "vhdcore", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    assert r.returncode in ok, r.stderr
    assert "Traceback" not in r.stderr
    return r


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, object]:
    """Every command's --json document, from one small chain."""
    d = tmp_path_factory.mktemp("json")
    build_chain(d, 3, size=4 * MiB, writes=20)
    out: dict[str, object] = {}

    def doc(name: str, *args, ok=(0,)) -> None:
        out[name] = json.loads(cli(*args, "--json", cwd=d, ok=ok).stdout)

    doc("info", "info", "child2.vhd")
    doc("map", "map", "child2.vhd", "--all")
    doc("create", "create", "new.vhd", "--size", "1.5M")
    doc("snapshot", "snapshot", "child2.vhd", "snap.vhd")
    doc("convert", "convert", "child2.vhd", "c.vhd", "--to", "fixed")
    doc("check", "check", "child2.vhd", "--chain")
    doc("repair", "repair", "child2.vhd", "--dry-run")
    doc("growth", "growth", "child2.vhd", "--blocks")
    doc("compact", "compact", "child2.vhd", "k.vhd", "--mode", "zero")
    doc("export", "export", "child2.vhd", "e.vhd.gz")
    doc("verify", "verify", "e.vhd.gz")
    doc("image", "image", "child2.vhd", "i.vhd.zst")
    doc("coalesce", "coalesce", "snap.vhd", "--verify")
    doc("compare", "compare", "child2.vhd", "c.vhd")
    doc("measure", "measure", "child2.vhd")
    doc("resize", "resize", "new.vhd", "3M")
    cli("snapshot", "child1.vhd", "other.vhd", cwd=d)
    doc("setparent", "set-parent", "other.vhd", "child1.vhd")
    cli("snapshot", "child1.vhd", "moving.vhd", cwd=d)
    doc("rebase", "rebase", "moving.vhd", "child2.vhd")
    return out


def test_the_document_covers_every_command() -> None:
    from vhdcore.cli.main import COMMANDS

    assert set(documented_keys()) >= set(COMMANDS) - {"worker"}  # a service: it prints no JSON


# submit, status and jobs need a broker: tests/test_fleet.py holds their documents to this vocabulary
FLEET = {"submit", "status", "jobs"}


@pytest.mark.parametrize("command", sorted(set(documented_keys()) - FLEET))
def test_command_json_follows_the_vocabulary(outputs, command: str) -> None:
    doc = outputs[command]
    keys = documented_keys()[command]
    entries = doc if isinstance(doc, list) else [doc]
    assert entries, command
    for e in entries:
        assert keys <= set(e), f"{command}: missing {sorted(keys - set(e))}"
    check_rules(doc)
    if command == "image":
        for stage in ("check", "export"):
            check_rules(doc[stage])


@pytest.mark.parametrize("args,code,ok", [
    (["info", "missing.vhd"], "ENOENT", 1),
    (["image", "child1.vhd", "base.vhd", "--overwrite"], "DestinationError", 1),
    (["check", "missing.vhd"], "ENOENT", 2),
    (["info", "garbage.vhd"], "InvalidFormatError", 1),
    (["verify", "garbage.vhd"], "ENOENT", 2),
    (["image", "child1.vhd", "out.vhd.bz2"], "InvalidArgument", 1),
])
def test_errors_are_one_json_object(tmp_path: Path, args: list[str], code: str, ok: int) -> None:
    build_chain(tmp_path, 2, size=1 * MiB, writes=2)
    (tmp_path / "garbage.vhd").write_bytes(b"\0" * 4096)
    r = cli(*args, "--json", cwd=tmp_path, ok=(ok,))
    err = json.loads(r.stdout)
    assert set(err) == {"code", "message", "path", "offset", "field"}, err
    assert err["code"] == code and err["message"] and r.stderr.count("\n") == 1, (err, r.stderr)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
@pytest.mark.parametrize("kind", ["fixed", "dynamic", "dynamic-full", "qemu-dynamic"])
def test_map_output_json_matches_qemu_img(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "d.vhd"
    if kind == "qemu-dynamic":  # a disk qemu-img wrote, with data written by qemu-io if available
        subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", str(p), "6M"], check=True)
        if shutil.which("qemu-io"):
            subprocess.run(["qemu-io", "-f", "vpc", "-c", "write -P 0x5a 2M 100k", str(p)], check=True,
                           capture_output=True)
    else:
        vhdcore.create(p, 8 * MiB, type="fixed" if kind == "fixed" else "dynamic", block_size=2 * MiB).close()
        with vhdcore.open(p, "r+") as d:
            d.write(3 * MiB, b"x" * 4096)
            d.write(6 * MiB + 512, b"y" * 70_000)
            if kind == "dynamic-full":
                d.write(0, b"z" * 2 * MiB)
    q = subprocess.run(["qemu-img", "map", "--output=json", "-f", "vpc", str(p)], capture_output=True, text=True,
                       check=True)
    ours = cli("map", "--output=json", p, cwd=tmp_path)
    assert json.loads(ours.stdout) == json.loads(q.stdout)
