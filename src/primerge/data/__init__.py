"""Labelled text tasks and their deterministic splits (:mod:`~primerge.data.tasks`), shared by the
evaluation suites and PAVE purification.

Floor 0: imports only :mod:`primerge.util`.
"""
