"""With ``CI`` set, a skip fails: the conftest's rule, run on a scratch suite in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from paths import TESTS

SCRATCH = '''
import pytest

missing = pytest.importorskip("a_module_that_is_not_installed") if {module_level} else None


def test_needs_a_model():
    pytest.skip("model package not installed")


@pytest.mark.xfail(reason="known", strict=True)
def test_known_failure():
    assert False
'''


def _run(tmp_path, ci: str | None, module_level: bool) -> subprocess.CompletedProcess:
    for name in ("conftest.py", "paths.py"):
        shutil.copy(TESTS / name, tmp_path / name)
    (tmp_path / "test_scratch.py").write_text(SCRATCH.format(module_level=module_level))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_without_ci_a_skip_is_a_skip(tmp_path, ci):
    res = _run(tmp_path, ci, module_level=False)
    assert res.returncode == 0 and "1 skipped" in res.stdout and "1 xfailed" in res.stdout, res.stdout


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_a_skip_fails_and_an_xfail_stays(tmp_path, ci):
    res = _run(tmp_path, ci, module_level=False)
    assert res.returncode == 1 and "1 failed" in res.stdout and "1 xfailed" in res.stdout, res.stdout
    assert "skipped under CI" in res.stdout and "model package not installed" in res.stdout


def test_under_ci_a_skipped_module_fails(tmp_path):
    res = _run(tmp_path, "true", module_level=True)
    assert res.returncode != 0 and "a_module_that_is_not_installed" in res.stdout, res.stdout
