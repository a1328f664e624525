"""Running a plan: the stream (:mod:`~primerge.engine.stream`: pre-passes, then work units, each
tensor handed to a sink as it is merged), the executors that run units here or on a Ray cluster
(:mod:`~primerge.engine.executors`, :mod:`~primerge.engine.ray`), and pre-flight, the check that a
merge fits before it starts (:mod:`~primerge.engine.preflight`).

Floor 4: above core and the outputs, below the API.
"""
