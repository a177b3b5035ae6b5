"""The fused CPU kernels' build: one folder per key, built once, then imported without ninja.

The keying is tested without compiling. The build itself is compiled ONCE per test session,
into a temporary extension root (never the real cache), by two processes started together
as two ranks would be (marker ``kernel_build``, about a minute on 2 cores; ``-m "not
kernel_build"`` skips it); a third, fresh process must then import it without building.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from partialfc.fast import cpu_kernels

REPO = Path(__file__).resolve().parents[1]
MESSAGE = "building Partial FC CPU kernels (one time)"

# argv: extension root, "build" (allowed to build) or "no-build" (torch's load refused).
# Prints the file of the module it got, after running one kernel on it.
LOAD = """
import sys
from pathlib import Path

import torch
import torch.utils.cpp_extension as ext

from partialfc.fast import cpu_kernels

if sys.argv[2] == "no-build":
    def refuse(*args, **kwargs):
        raise AssertionError("torch.utils.cpp_extension.load (ninja) was called")
    ext.load = refuse
module = cpu_kernels.load_kernels(Path(sys.argv[1]))
weight = torch.randn(5, 3)
out, inv = torch.empty(2, 3), torch.empty(2)
module.gather_rows_inv_norm(weight, torch.tensor([0, 4]), out, inv, 1e-12)
assert torch.equal(out, weight[[0, 4]])
print(module.__file__)
"""


def _start(root: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", LOAD, str(root), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def test_build_folder_is_keyed_by_what_changes_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = cpu_kernels.build_dir(tmp_path)
    assert base == cpu_kernels.build_dir(tmp_path) and base.parent == tmp_path
    assert base.name.isidentifier()  # it is also the module's name
    flags = cpu_kernels.build_dir(tmp_path, [*cpu_kernels._CFLAGS, "-DOTHER"])
    other_checkout = tmp_path / "checkout" / "cpu_kernels.cpp"
    other_checkout.parent.mkdir()
    other_checkout.write_bytes(cpu_kernels._SOURCE.read_bytes())  # same bytes, other path
    keys = {base, flags}
    for target, name, value in (
        (cpu_kernels, "_SOURCE", other_checkout),
        (sys, "prefix", "/elsewhere/venv"),
        (torch, "__version__", "0.0.0"),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(target, name, value)
            keys.add(cpu_kernels.build_dir(tmp_path))
    other_checkout.write_bytes(other_checkout.read_bytes() + b"\n// changed\n")
    monkeypatch.setattr(cpu_kernels, "_SOURCE", other_checkout)
    keys.add(cpu_kernels.build_dir(tmp_path))
    assert len(keys) == 6, keys


def test_unfinished_or_broken_builds_are_not_imported(tmp_path: Path) -> None:
    """No ``ready`` marker (a build in progress or killed), or one naming a file that does
    not import: no module, so the caller goes on to build (under torch's lock)."""
    folder = tmp_path / "build"
    folder.mkdir()
    (folder / "mod.so").write_bytes(b"not a shared object")
    assert cpu_kernels._import_built(folder) is None
    (folder / "ready").write_text("mod.so")
    assert cpu_kernels._import_built(folder) is None


@pytest.fixture(scope="module")
def fresh_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple]]:
    """Two processes that find no build start together: the session's one compilation."""
    root = tmp_path_factory.mktemp("torch_extensions")
    procs = [_start(root, "build") for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=1500)
        results.append((proc.returncode, out, err))
    return root, results


@pytest.mark.kernel_build
@pytest.mark.timeout(1800)
def test_two_ranks_building_at_once_share_one_build(fresh_build: tuple) -> None:
    root, results = fresh_build
    for code, _, err in results:
        assert code == 0, err
    folder = cpu_kernels.build_dir(root)
    assert [p.name for p in root.iterdir()] == [folder.name]
    so = folder / (folder / "ready").read_text()
    assert {out.strip() for _, out, _ in results} == {str(so)}
    assert any(MESSAGE in err for _, _, err in results)


@pytest.mark.kernel_build
@pytest.mark.timeout(1800)
def test_a_later_start_imports_the_build_without_ninja(fresh_build: tuple) -> None:
    root, _ = fresh_build
    folder = cpu_kernels.build_dir(root)
    so = folder / (folder / "ready").read_text()
    before = {p.name: p.stat().st_mtime_ns for p in (so, folder / ".ninja_log")}
    proc = _start(root, "no-build")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert MESSAGE not in err
    assert out.strip() == str(so)
    assert {p.name: p.stat().st_mtime_ns for p in (so, folder / ".ninja_log")} == before
