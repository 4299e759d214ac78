"""The documentation site builds without a warning and documents every public name.

The build here skips running the gallery (``plot_gallery=0``), which takes minutes;
``.ci/run`` builds the whole site, examples included, after the tests. It builds a copy
of docs/ and examples/, because Sphinx writes the generated API pages and the gallery's
pages into its source folder, and a gallery written without running the examples would
be taken up by the next full build as if it were up to date.
"""

import importlib
import inspect
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Modules whose public names the API reference must cover, besides skmerge.__all__:
# their __all__ where they declare one, else the classes and functions they define.
PUBLIC_MODULES = [
    "skmerge.datasets",
    "skmerge.model_selection",
    "skmerge.metrics",
    "skmerge.stats",
    "skmerge.calibration",
    "skmerge.shadows",
    "skmerge.laue",
    "skmerge.geometry",
    "skmerge.store",
    "skmerge.ambiguity",
    "skmerge.analysis",
    "skmerge.report",
    "skmerge.workflow",
    "skmerge.model.distributed",
    "skmerge.model.marginals",
    "skmerge.model.decay",
    "skmerge.half_datasets",
    "skmerge.baseline",
    "skmerge.diagnostics",
    "skmerge.errors",
    "skmerge.io",
    "skmerge.io.mtz",
    "skmerge.io.xds",
    "skmerge.io.crystfel",
    "skmerge.io.dials",
    "skmerge.io.writers",
]


def public_names():
    import skmerge

    names = {f"skmerge.{name}" for name in skmerge.__all__}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        if hasattr(module, "__all__"):
            own = module.__all__
        else:
            own = [
                name for name, value in vars(module).items()
                if not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
                and value.__module__ == module_name
            ]
        names |= {f"{module_name}.{name}" for name in own}
    return names


def documented_names(inventory):
    """The Python objects of a Sphinx ``objects.inv``: four header lines, then zlib-compressed
    lines ``name domain:role priority uri display-name``."""
    with open(inventory, "rb") as handle:
        for _ in range(4):
            handle.readline()
        lines = zlib.decompress(handle.read()).decode().splitlines()
    return {line.split(" ", 1)[0] for line in lines if line.split(" ", 2)[1].startswith("py:")}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    for extension in ("sphinx", "numpydoc", "sphinx_gallery", "myst_parser", "pydata_sphinx_theme"):
        pytest.importorskip(extension, reason=f"{extension} is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("docs")
    built = shutil.ignore_patterns("_build", "generated", "auto_examples", "sg_execution_times.rst")
    shutil.copytree(DOCS, out / "docs", ignore=built)
    shutil.copytree(ROOT / "examples", out / "examples")
    # conf.py puts the copy's parent on sys.path; this checkout's skmerge must come first.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-D", "plot_gallery=0",
         "-d", str(out / "doctrees"), str(out / "docs"), str(out / "html")],
        capture_output=True, text=True, cwd=out, env=env,
    )
    assert build.returncode == 0, f"the documentation does not build cleanly:\n{build.stderr[-5000:]}"
    return out / "html"


def test_every_public_name_is_in_the_api_reference(site):
    expected = public_names()
    assert {"skmerge.VariationalMerger", "skmerge.stats.cc_half", "skmerge.io.writers.write_mtz"} <= expected
    missing = expected - documented_names(site / "objects.inv")
    assert not missing, f"add these to docs/api.rst: {sorted(missing)}"


def test_command_line_reference_shows_every_subcommand(site):
    from skmerge.cli import build_parser

    page = (site / "cli_reference.html").read_text()
    commands = next(action.choices for action in build_parser()._actions if hasattr(action, "choices")
                    and isinstance(action.choices, dict))
    assert len(commands) >= 4
    for name, command in commands.items():
        assert f"skmerge {name}" in page
        # The help text itself, not only the title: the first option of each command.
        flags = [flag for action in command._actions for flag in action.option_strings if flag != "-h"]
        if flags:
            assert flags[0] in page, (name, flags[0])


def test_the_gallery_and_the_markdown_pages_are_in_the_site(site):
    examples = sorted(path.stem for path in (ROOT / "examples").glob("plot_*.py"))
    assert len(examples) >= 6
    for name in examples:
        assert (site / "auto_examples" / f"{name}.html").exists(), name
    for page in ("model", "model_selection", "cli"):
        assert (site / f"{page}.html").exists(), page
