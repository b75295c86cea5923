"""The native kernels are built for the architecture's generic target, never for the build host,
so that results (and the library) travel between machines (issue 20)."""
from __future__ import annotations

import platform

from dyrelu.fused import _native

HOST_SPECIFIC = ("native",)  # -march=native, -mtune=native, -mcpu=native


def test_build_command_has_no_host_specific_flag():
    cmd = _native.build_command("gcc", "/tmp/out.so")
    target_flags = [f for f in cmd if f.startswith(("-march=", "-mtune=", "-mcpu="))]
    assert not [f for f in target_flags if f.split("=", 1)[1] in HOST_SPECIFIC], cmd
    assert "-ffp-contract=off" in cmd  # no FMA contraction: a * b + c rounds twice everywhere
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "-march=x86-64" in cmd and "-mtune=generic" in cmd, cmd


def test_cache_key_changes_with_the_flags(monkeypatch, tmp_path):
    """A library built with other flags (say, an old -march=native one) is never loaded."""
    names = []

    def fake_compile(cc, path):
        names.append(path)
        raise OSError("not building in this test")

    monkeypatch.setenv("DYRELU_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(_native, "_compile", fake_compile)
    monkeypatch.setattr(_native.shutil, "which", lambda cc: "/usr/bin/" + cc)
    for flags in (_native.FLAGS, [*_native.FLAGS, "-march=native"]):
        monkeypatch.setattr(_native, "FLAGS", flags)
        try:
            _native._build()
        except OSError:
            pass
    assert len(names) >= 2 and len({n.rsplit("/", 1)[-1] for n in names}) >= 2
