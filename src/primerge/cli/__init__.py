"""The ``primerge`` command line: every subcommand is registered here. :mod:`~primerge.cli.main`
builds the parser and runs a command; the lab's subcommands (``zoo``, ``eval``, ``demo``,
``tune``, ``analyze``, ``bench``) live beside it, one module each.

Floor 7, the top: imports anything, imported by nothing but ``python -m primerge``.
"""
