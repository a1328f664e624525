"""Checkpoint input and output: lazy readers (safetensors, guarded pickles), PEFT LoRA adapters,
the atomic sharded writer, the output manifest, the output-location policy (``destination``),
file-name encoding of user text (``names``), defensive file checks (``files``), and Hugging Face
loading from local folders.

Floors: the bottom one, with errors, linalg and seeding: it imports nothing of primerge but
:mod:`primerge.util.errors` and :mod:`primerge.util.patterns` (bounded-time regular expressions), and knows
nothing of methods, plans or outputs.
"""
