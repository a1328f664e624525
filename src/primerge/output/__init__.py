"""Outputs of a merge ("sinks"), beside the engine: each receives the merged tensors in plan order.

- :class:`~primerge.output.folder.ModelFolder`: the merged model as sharded safetensors, with a
  per-task method's extra files (:mod:`primerge.output.per_task`);
- :class:`~primerge.output.folder.LoraFolder`: a PEFT LoRA adapter (:mod:`primerge.output.lora`);
- :class:`~primerge.output.memory.MemorySink`: tensors returned in memory (Python API).

Floors: this package sits beside the engine, above io, methods and plan; the engine hands it
tensors and knows nothing of file formats.
"""
