"""The C++ CPU kernels (core/cpu_ops.py) build with Clang as with GCC, and give the same numbers:
the kernel tests run again in a process whose extension is compiled by clang++."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KERNEL_TESTS = ["tests/test_elementwise.py", "tests/test_varlen.py", "tests/test_block_cache.py"]


@pytest.mark.slow
def test_the_kernels_build_with_clang_and_pass_their_tests(tmp_path):
    clang = shutil.which("clang++")
    assert clang, "clang++ is not installed (scripts/setup.sh test installs it: apt-get install clang)"
    ext = tmp_path / "ext"
    env = {**os.environ, "CXX": clang, "TORCH_EXTENSIONS_DIR": str(ext)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS,
                          "-k", "not without_a_compiler"],  # that one empties PATH itself
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    # test_elementwise asserts cpu_ops.ops() is not None: the kernels were built, not skipped
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]
    builds = list(ext.glob("prepack_cpu_ops_*/build.ninja"))
    assert len(builds) == 1, builds  # one build, by clang
    assert f"cxx = {clang}" in builds[0].read_text()
    assert list(ext.glob("prepack_cpu_ops_*/*.so")), "no module was built"
