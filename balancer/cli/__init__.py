"""
The ``balancer`` command: ``demo``, ``accounts`` and ``fake-server``.

:mod:`.main` holds the parser and :func:`main`; each command has a module of
its own (:mod:`.accounts`, :mod:`.fake_server`, the :mod:`.demo` package),
and every import points down: from :mod:`.main` to the commands, from the
commands to :mod:`.console` and :mod:`.logs`, never back. Nothing outside
this package imports it but ``balancer.__main__`` (import-linter checks it).
"""

from __future__ import annotations

from .main import build_parser, main

__all__ = ["build_parser", "main"]
