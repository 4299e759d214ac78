"""The command line against hostile inputs (the cases of ``_hostile.CLI_CASES``): each
ends with its exit status and one line of error naming the culprit, no traceback, and
no file left behind; and the same under a 4 GB address-space limit (prlimit)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from skmerge.cli import main

from _hostile import CLI_CASES, run_cli_cases


def check(name, result):
    assert result["status"] == result["expected"], f"{name}: {result['err']}"
    err = result["err"]
    errors = [line for line in err.splitlines() if line.startswith("skmerge: error: ")]
    assert "Traceback" not in err and len(errors) == 1, f"{name}: {err}"
    assert result["culprit"] in errors[0], f"{name}: {errors[0]!r} does not name {result['culprit']!r}"
    assert result["left"] == [], f"{name} left {result['left']}"


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_case(name, tmp_path):
    result = run_cli_cases(tmp_path, [name], main)[name]
    check(name, result)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is not installed")
def test_cli_cases_under_a_4_gb_address_space_limit(tmp_path):
    """Every case again in one process limited to 4 GB of address space: a crafted header
    that made a reader allocate for what it declares would end in MemoryError here."""
    driver = Path(__file__).with_name("_hostile.py")
    command = ["prlimit", "--as=4000000000", sys.executable, str(driver), str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=driver.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.splitlines()[-1])
    assert set(results) == set(CLI_CASES)
    for name, result in results.items():
        check(name, result)
