"""The LLM track: a real decoder (SmolLM2-135M-Instruct from a pip-packaged GGUF), LoRA and full
fine-tunes on prompted classification tasks, merged through the public API and evaluated with
lm-evaluation-harness, offline.

Modules: :mod:`.convert` (GGUF -> Hugging Face folder, causal-LM checks), :mod:`.prompts` (tasks as
prompts, label words), :mod:`.harness` (lm-eval task files and runs), :mod:`.models` (loading
folders, adapters, merged states), :mod:`.training` and :mod:`.zoo` (the cached zoos),
:mod:`.estimates` (n, standard error, 95% interval), :mod:`.scores` (cached scores), :mod:`.demo` and
:mod:`.report` (``primerge demo --suite llm``); the ``--suite llm`` / ``--harness lm-eval`` options are
:mod:`primerge.cli.llm`.
"""
