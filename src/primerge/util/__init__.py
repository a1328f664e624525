"""The bottom floor: what every layer needs and no layer owns.

Errors (:mod:`~primerge.util.errors`), validation of user-written mappings against pydantic models
(:mod:`~primerge.util.schema`), bounded-time regular expressions (:mod:`~primerge.util.patterns`),
name-derived seeds (:mod:`~primerge.util.seeding`), thread-count-independent LAPACK
(:mod:`~primerge.util.deterministic`), lazy package attributes (:mod:`~primerge.util.lazy`) and the
cache folders (:mod:`~primerge.util.cache_dirs`).

Floor 0: imports nothing of primerge's above it.
"""
