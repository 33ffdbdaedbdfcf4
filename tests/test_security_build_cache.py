"""The compiled-extension cache holds native code that gets loaded into the process: a cache
folder that someone else controls is refused (never built into, never loaded from), the library
then falls back to the ``torch`` backend with one warning, and the cache key changes with
everything that makes an old binary wrong (torch, CUDA, the sources)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import torch

from pks4_layers.ops import build

UID = os.getuid()
IS_ROOT = UID == 0
NOBODY = 65534  # the conventional uid of "nobody"; only root can chown to it


def _cpu_key() -> str:
    return build._source_hash(build.CPU_SOURCES, build.CPU_CFLAGS + build.CPU_LDFLAGS)


def _private(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _fake_owner(monkeypatch: pytest.MonkeyPatch, target: Path, uid: int) -> None:
    """``os.lstat`` of ``target`` reports owner ``uid``: another user's folder without chown."""
    real_lstat = os.lstat

    def lstat(path, *args, **kwargs):
        st = real_lstat(path, *args, **kwargs)
        if os.fspath(path) != os.fspath(target):
            return st
        fields = list(st[:10])
        fields[4] = uid  # st_uid
        return os.stat_result(fields)

    monkeypatch.setattr(os, "lstat", lstat)


# ------------------------------------------------------------------------- the check itself
@pytest.mark.parametrize("mode", [0o700, 0o750, 0o755, 0o711])
def test_a_private_dir_is_accepted(tmp_path, mode):
    folder = tmp_path / "cache"
    folder.mkdir()
    folder.chmod(mode)
    build._check_private_dir(folder)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o720, 0o702, 0o1777])
def test_a_dir_writable_by_group_or_others_is_refused(tmp_path, mode):
    folder = tmp_path / "cache"
    folder.mkdir()
    folder.chmod(mode)
    with pytest.raises(PermissionError) as info:
        build._check_private_dir(folder)
    assert str(info.value) == (
        f"refusing the extension cache {str(folder)!r}: it is writable by group/others "
        f"(mode {mode & 0o7777:#o}, owner uid {UID}); expected no group/other write "
        "permission, e.g. mode 0o700; use a private directory (mode 0o700, your own) or set "
        "PKS4_CACHE_DIR to one"
    )


def test_a_dir_owned_by_another_user_is_refused_simulated(tmp_path, monkeypatch):
    """Owner taken from a patched ``os.lstat``: works for any user running the tests."""
    folder = _private(tmp_path / "cache")
    _fake_owner(monkeypatch, folder, UID + 4242)
    with pytest.raises(PermissionError) as info:
        build._check_private_dir(folder)
    assert str(info.value) == (
        f"refusing the extension cache {str(folder)!r}: it is owned by uid {UID + 4242} "
        f"(mode 0o700); expected a directory owned by uid {UID}, the user running this "
        "process; use a private directory (mode 0o700, your own) or set PKS4_CACHE_DIR to one"
    )


def test_a_dir_of_ours_is_refused_to_another_process_user(tmp_path, monkeypatch):
    """The same, seen from the other side: our folder, checked by a process of another uid."""
    folder = _private(tmp_path / "cache")
    monkeypatch.setattr(os, "getuid", lambda: UID + 1)
    with pytest.raises(PermissionError, match=rf"owned by uid {UID} .*owned by uid {UID + 1},"):
        build._check_private_dir(folder)


@pytest.mark.skipif(not IS_ROOT, reason="only root can give a folder to another user")
def test_a_dir_really_owned_by_nobody_is_refused(tmp_path):
    folder = _private(tmp_path / "cache")
    os.chown(folder, NOBODY, NOBODY)
    with pytest.raises(PermissionError, match=rf"owned by uid {NOBODY} \(mode 0o700\)"):
        build._check_private_dir(folder)


def test_a_symlink_is_refused_even_to_a_private_dir(tmp_path):
    """A link is refused rather than followed: its target is wherever its author chose."""
    target = _private(tmp_path / "elsewhere")
    link = tmp_path / "cache"
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(PermissionError) as info:
        build._check_private_dir(link)
    assert str(info.value) == (
        f"refusing the extension cache {str(link)!r}: it is a symbolic link (to "
        f"{str(target)!r}); expected a real directory; use a private directory (mode 0o700, "
        "your own) or set PKS4_CACHE_DIR to one"
    )


def test_a_file_in_place_of_the_dir_is_refused(tmp_path):
    path = tmp_path / "cache"
    path.write_text("")
    with pytest.raises(PermissionError, match="it is not a directory; expected a directory"):
        build._check_private_dir(path)


def test_missing_levels_are_created_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0)  # the loosest umask: the library's own mode must hold
    try:
        root = build._private_dir(tmp_path / "a" / "b" / "cache")
        key_dir = build._private_dir(root / "pks4_cpu_0123")
    finally:
        os.umask(old)
    for folder in (root, key_dir):
        st = os.lstat(folder)
        assert (st.st_mode & 0o777, st.st_uid) == (0o700, UID), folder


# ---------------------------------------------------- load(): refused, nothing built or loaded
@pytest.fixture
def first_load(monkeypatch, tmp_path) -> Callable[[], tuple[build.ExtensionStatus, list]]:
    """``build.load("cpu")`` as the first call of a process would run it, JIT path forced, with
    ``cpp_extension.load`` and ``torch.ops.load_library`` replaced by recorders: whatever the
    check lets through shows up in the calls, and nothing is really compiled or loaded."""
    from torch.utils import cpp_extension

    calls: list = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw["build_directory"]))
    monkeypatch.setattr(torch.ops, "load_library", lambda path: calls.append(path))
    monkeypatch.setattr(build, "_status", {})
    monkeypatch.setenv("PKS4_FORCE_JIT", "1")
    monkeypatch.delenv("PKS4_NO_EXT", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)  # restored after: _jit_build may set it
    monkeypatch.setenv("PKS4_CACHE_DIR", str(tmp_path / "cache"))

    def run() -> tuple[build.ExtensionStatus, list]:
        return build.load("cpu"), calls

    return run


def _plant(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A private cache root, its key folder and a "binary" at the exact path that load() uses."""
    root = _private(tmp_path / "cache")
    name = f"pks4_cpu_{_cpu_key()}"
    key_dir = _private(root / name)
    library = key_dir / f"{name}.so"
    library.write_bytes(b"\x7fELF planted")
    return root, key_dir, library


def test_first_load_control_a_private_cache_is_used(first_load, tmp_path):
    """Control for the cases below: with a private cache the build does go ahead."""
    _, key_dir, _ = _plant(tmp_path)
    status, calls = first_load()
    assert calls == [str(key_dir)], status
    assert status.loaded and status.origin == f"built on first use in {key_dir}"


def _world_writable_root(root: Path, key_dir: Path, library: Path) -> str:
    root.chmod(0o777)
    return f"refusing the extension cache {str(root)!r}: it is writable by group/others"


def _group_writable_key_dir(root: Path, key_dir: Path, library: Path) -> str:
    key_dir.chmod(0o770)
    return f"refusing the extension cache {str(key_dir)!r}: it is writable by group/others"


def _key_dir_links_elsewhere(root: Path, key_dir: Path, library: Path) -> str:
    elsewhere = root.parent / "attacker"
    key_dir.rename(elsewhere)  # the planted binary now lives there
    key_dir.symlink_to(elsewhere, target_is_directory=True)
    return f"refusing the extension cache {str(key_dir)!r}: it is a symbolic link"


def _root_links_elsewhere(root: Path, key_dir: Path, library: Path) -> str:
    elsewhere = root.parent / "attacker"
    root.rename(elsewhere)
    root.symlink_to(elsewhere, target_is_directory=True)
    return f"refusing the extension cache {str(root)!r}: it is a symbolic link"


def _library_links_elsewhere(root: Path, key_dir: Path, library: Path) -> str:
    elsewhere = root.parent / "attacker.so"
    library.rename(elsewhere)
    library.symlink_to(elsewhere)
    return (
        f"refusing the built extension {str(library)!r}: it is a symbolic link owned by uid "
        f"{UID}; expected a regular file owned by uid {UID}; delete it to rebuild"
    )


def _key_dir_of_nobody(root: Path, key_dir: Path, library: Path) -> str:
    if not IS_ROOT:
        pytest.skip("only root can give a folder to another user")
    os.chown(key_dir, NOBODY, NOBODY)
    return f"refusing the extension cache {str(key_dir)!r}: it is owned by uid {NOBODY}"


@pytest.mark.parametrize(
    "damage",
    [
        _world_writable_root,
        _group_writable_key_dir,
        _key_dir_links_elsewhere,
        _root_links_elsewhere,
        _library_links_elsewhere,
        _key_dir_of_nobody,
    ],
)
def test_an_unsafe_cache_is_refused_before_building_or_loading(first_load, tmp_path, damage):
    root, key_dir, library = _plant(tmp_path)
    expected = damage(root, key_dir, library)
    status, calls = first_load()
    assert calls == [], "the build or load went ahead in an unsafe cache"
    assert not status.loaded and status.origin == ""
    assert status.reason.startswith(f"PermissionError: {expected}"), status.reason


def test_a_key_dir_of_another_user_is_refused_simulated(first_load, tmp_path, monkeypatch):
    _, key_dir, _ = _plant(tmp_path)
    _fake_owner(monkeypatch, key_dir, UID + 4242)
    status, calls = first_load()
    assert calls == [] and not status.loaded
    assert f"{str(key_dir)!r}: it is owned by uid {UID + 4242}" in status.reason


# -------------------------------------------------------------------------------- cache key
def test_the_cache_key_follows_torch_cuda_and_every_source_byte(tmp_path, monkeypatch):
    base = _cpu_key()
    assert _cpu_key() == base  # deterministic

    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", torch.__version__ + ".post1")
        assert _cpu_key() != base, "a new torch version must not reuse the old binary"
    for cuda in (None, "11.8", "99.9"):
        if cuda != torch.version.cuda:
            with monkeypatch.context() as m:
                m.setattr(torch.version, "cuda", cuda)
                assert _cpu_key() != base, f"CUDA {cuda} must not reuse the old binary"
    assert build._source_hash(build.CPU_SOURCES, [*build.CPU_CFLAGS, "-O0"]) != base

    copy = tmp_path / "motion_scan"
    shutil.copytree(build.csrc_dir(), copy)
    monkeypatch.setattr(build, "csrc_dir", lambda: copy)
    assert _cpu_key() == base  # same bytes elsewhere: same key
    for name in ("motion_scan_fwd_cpu.cpp", "cpu_update.h"):  # a source and a header
        path = copy / name
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one byte changed
        assert _cpu_key() != base, f"a change in {name} must not reuse the old binary"
        path.write_bytes(original)
    assert _cpu_key() == base


# ------------------------------------------------ a real build, then its cache made unsafe
_RUN_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, warnings
    import torch
    from pks4_layers import motion_scan
    from pks4_layers.ops import build

    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(1, 4, 2, 3, generator=g) for _ in range(3))
    A = -torch.rand(3, 2, generator=g) - 0.1
    B, C = (torch.randn(1, 4, 2, 2, generator=g) for _ in range(2))
    args = dict(u=u, delta=delta, A=A, B=B, C=C, z=z)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = motion_scan(**args)  # "auto": the compiled CPU backend if it loads
        y2 = motion_scan(**args)  # a second call must not warn again
    ref = motion_scan(**args, backend="torch")
    with open("/proc/self/maps") as f:
        mapped = sorted({line.split()[-1] for line in f if "pks4_cpu_" in line})
    print(json.dumps({
        "status": dataclasses.asdict(build.load("cpu")),
        "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
        "max_diff": max((y - ref).abs().max().item(), (y2 - ref).abs().max().item()),
        "mapped": mapped,
    }))
    """
)


def _run(cache: Path, umask: int = 0o022) -> tuple[dict, str]:
    env = dict(os.environ)
    for key in ("PKS4_NO_EXT", "PKS4_BACKEND"):
        env.pop(key, None)
    env["PKS4_CACHE_DIR"] = str(cache)
    env["PKS4_FORCE_JIT"] = "1"  # even if an ahead-of-time build sits in the package
    # ninja is installed next to the interpreter (a virtual environment's bin/), which is on the
    # PATH only when the environment is activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        preexec_fn=lambda: os.umask(umask),
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> tuple[Path, Path]:
    """One real JIT build of the CPU kernels, shared by the tests below; built under umask 0
    so that the owner-only modes are seen to come from the library, not from the umask."""
    cache = tmp_path_factory.mktemp("jit") / "cache"
    result, stderr = _run(cache, umask=0)
    assert result["status"]["loaded"], result
    assert "compiling the CPU kernels" in stderr
    (key_dir,) = cache.glob("pks4_cpu_*")
    return cache, key_dir


@pytest.mark.slow
def test_a_jit_build_makes_owner_only_folders_and_is_reused(built_cache):
    cache, key_dir = built_cache
    for folder in (cache, key_dir):
        st = os.lstat(folder)
        assert (st.st_mode & 0o777, st.st_uid) == (0o700, UID), folder
    (library,) = key_dir.glob("pks4_cpu_*.so")
    result, stderr = _run(cache)
    assert "compiling" not in stderr, stderr
    assert result["status"]["loaded"], result
    assert result["status"]["origin"] == f"built on first use in {key_dir}"
    assert result["mapped"] == [str(library)] and result["warnings"] == []
    assert result["max_diff"] < 1e-5, result


def _loose_key_dir(cache: Path, key_dir: Path) -> tuple[Path, str]:
    key_dir.chmod(0o777)
    return cache, f"refusing the extension cache {str(key_dir)!r}: it is writable by group/others"


def _loose_root(cache: Path, key_dir: Path) -> tuple[Path, str]:
    cache.chmod(0o757)
    return cache, f"refusing the extension cache {str(cache)!r}: it is writable by group/others"


def _linked_root(cache: Path, key_dir: Path) -> tuple[Path, str]:
    link = cache.parent / "link"
    link.symlink_to(cache, target_is_directory=True)
    return link, f"refusing the extension cache {str(link)!r}: it is a symbolic link"


def _key_dir_of_nobody(cache: Path, key_dir: Path) -> tuple[Path, str]:
    if not IS_ROOT:
        pytest.skip("only root can give a folder to another user")
    os.chown(key_dir, NOBODY, NOBODY)
    return cache, f"refusing the extension cache {str(key_dir)!r}: it is owned by uid {NOBODY}"


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_loose_key_dir, _loose_root, _linked_root, _key_dir_of_nobody])
def test_a_built_binary_in_an_unsafe_cache_is_not_loaded(built_cache, damage):
    """The real binary sits there, ready to load: it is not, the op runs on the torch backend
    and says why once."""
    cache, key_dir = built_cache
    try:
        env_cache, expected = damage(cache, key_dir)
        result, stderr = _run(env_cache)
    finally:  # the next case starts from the private cache again
        if IS_ROOT:
            os.chown(key_dir, UID, os.getgid())
        cache.chmod(0o700)
        key_dir.chmod(0o700)
        (cache.parent / "link").unlink(missing_ok=True)
    status = result["status"]
    assert not status["loaded"], status
    assert status["reason"].startswith(f"PermissionError: {expected}"), status["reason"]
    assert result["mapped"] == [], "a binary from the refused cache was loaded"
    assert "compiling" not in stderr, stderr
    assert result["warnings"] == [
        f"pks4_layers: the compiled 'cpu' backend is unavailable ({status['reason']}); "
        "using the 'torch' backend instead"
    ]
    assert result["max_diff"] == 0.0  # the torch backend itself
