"""Checkpoint input and output: lazy readers (safetensors, guarded pickles), PEFT LoRA adapters,
the atomic sharded writer, the output manifest, and Hugging Face loading from local folders.

Floors: the bottom one, with errors, linalg and seeding: it imports nothing of primerge but
:mod:`primerge.errors`, and knows nothing of methods, plans or outputs.
"""
