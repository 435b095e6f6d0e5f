"""A griffe extension for the API reference (mkdocs.yml loads it). The docstrings use Sphinx roles
(:class:`~a.b.C`, :func:`f`, ...), which Markdown would show literally: each becomes a code span (`C`, `f`). Their
reStructuredText ``Example::`` blocks become Google-style ``Example:`` sections, whose doctests show as code."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|data|attr|mod|exc|obj):`~?([^`]+)`")
LITERAL_EXAMPLE = re.compile(r"^(\s*Examples?)::[ \t]*$", re.MULTILINE)


def _plain(match: re.Match[str]) -> str:
    target = match.group(1)
    # "~a.b.C" shows "C" in Sphinx; show the last part for every dotted target, as readers see it
    return f"`{target.rsplit('.', 1)[-1]}`" if match.group(0).count("~") else f"`{target}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles and literal example blocks in every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = ROLE.sub(_plain, obj.docstring.value)
            obj.docstring.value = LITERAL_EXAMPLE.sub(r"\1:", text)
