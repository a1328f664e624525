"""Labelled text tasks and their deterministic splits (:mod:`~primerge.data.tasks`), shared by the
evaluation suites and PAVE purification, and texts as prompts cut to a token budget
(:mod:`~primerge.data.prompts`), shared by the LLM track and the calibration pass.

Floor 0: imports only :mod:`primerge.util`.
"""
