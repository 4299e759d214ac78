"""Sphinx configuration of skmerge's documentation site (see README.md beside it)."""

import re
import sys
from pathlib import Path

# Document the checkout this folder belongs to, even when another copy is installed.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

import skmerge  # noqa: E402

project = "skmerge"
author = "skmerge developers"
copyright = "skmerge developers"
version = release = skmerge.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
    "command_help",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "README.md"]
templates_path = ["_templates"]

autosummary_generate = True
# Classes list their own methods through the autosummary template; numpydoc would list
# every inherited scikit-learn and TensorFlow member again.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

# The Markdown pages link to sections of each other by their anchors.
myst_heading_anchors = 3

sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    # The full search on the real HypF data takes hours; it is a script, not a gallery page.
    "ignore_pattern": r"choose_dof_hypf\.py",
    # A name, not the function: Sphinx caches its configuration and cannot pickle functions.
    "within_subsection_order": "gallery_order.example_order",
    "download_all_examples": False,
    "abort_on_example_error": True,
}

html_theme = "pydata_sphinx_theme"
html_title = f"skmerge {version}"
html_theme_options = {"navigation_with_keys": False, "secondary_sidebar_items": ["page-toc"]}


def skip_metadata_requests(app, what, name, obj, skip, options):
    """scikit-learn generates ``set_<method>_request`` on every estimator; their docstrings
    refer to scikit-learn's own glossary and belong to its documentation."""
    return True if re.fullmatch(r"set_\w+_request", name) else None


def setup(app):
    app.connect("autodoc-skip-member", skip_metadata_requests)
