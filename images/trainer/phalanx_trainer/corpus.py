"""The built-in training corpus: English technical text that ships with every Python install.

Two sources, both read locally so training works without network access:
the interactive help topics in ``pydoc_data.topics`` and the module, class and function
docstrings of the top-level standard-library modules (parsed with ``ast``, never imported,
so no module side effects run). Order is sorted, so the corpus is deterministic for a given
Python installation.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Docstrings shorter than this are mostly one-liners ("Return self.") that add little text.
MIN_DOCSTRING_CHARS = 200

_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name].strip()


def stdlib_docstrings(stdlib_dir: Path | None = None) -> Iterator[str]:
    root = stdlib_dir or Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, _DOCUMENTED):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    yield doc


def builtin_documents() -> list[str]:
    """Every document of the built-in corpus (about 1 MB of text)."""
    return [doc for doc in (*pydoc_topics(), *stdlib_docstrings()) if doc]
