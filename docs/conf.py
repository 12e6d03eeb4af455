"""Sphinx configuration of the idsfs documentation.

Build (what ``.ci/run`` does, warnings are errors)::

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html

The pages are Markdown, read by myst-parser; ``api.md`` pulls the reference
of the client library from the docstrings with autodoc.
"""

from __future__ import annotations

import os
import sys

# The package is installed in the venv (pip install -e); putting the checkout
# first makes a build from a plain checkout document the code beside it.
sys.path.insert(0, os.path.abspath(".."))

from idsfs import __version__

project = "idsfs"
author = "the idsfs authors"
copyright = "the idsfs authors"
version = release = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Markdown: GitHub-style anchors for headings down to level 3, so that
# [text](page.md#a-heading) links work as they do on the forge.
myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]

# autodoc: members in source order, type hints in the descriptions (the
# signatures of the python-icat-compatible methods stay readable).
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}

html_theme = "alabaster"
html_title = f"idsfs {release}"
html_theme_options = {
    "description": "Mount an ICAT Data Service archive as a directory tree",
    "fixed_sidebar": True,
    "page_width": "1200px",
    "sidebar_width": "250px",
}
