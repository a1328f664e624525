"""RegMean++'s data pass: each layer's inputs taken through the merged model's earlier layers
(Nguyen et al. 2025, Section 3: X_t^(l) = f_M^(l−1)(X_t^(l−1)) instead of RegMean's f_t^(l−1)).

One working model of the base's architecture (``transformers.AutoModel`` of the base folder, float32)
walks the network in its order of execution, in *stages*: the modules before the first block (the
prefix: embeddings), each block of the repeated stack (``encoder.layer.i``, ``layers.i``), and the
modules after it (the suffix: a pooler, a final norm). At stage s, for each task t:

1. the working model holds the merged weights of every stage before s (they are final) and model
   t's own weights θ₀ + τ_t in stage s (RegMean++ keeps a block's intra-layer dependencies: the
   attention output projection sees model t's attention), and task t's texts run through stage s
   with a forward hook on its linear layers (:class:`~primerge.purify.covariance.InputStatistics`:
   G_t = XᵀX / rows over the real tokens);
2. the Grams of all tasks are written to the stage's file, and the stage's tensors are merged by the
   engine's own :func:`~primerge.engine.stream.merge_tensor` with them, so the weights the next stage
   runs through are the ones the merge will write (cast to the output dtype, LiNeS applied);
3. task t's hidden states advance through the merged stage.

Every tensor of the model is merged once before the walk (the method's mean where no Gram is known
yet), so the only weights that change later are those of the stage being merged. Model t's weights
come from the plan's task vectors, so a LoRA adapter is θ₀ + s·B A as the merge reads it (no peft
load), and the texts run as the block's prompt template for model t makes them, when it has one
(:func:`~primerge.purify.covariance.token_batches`). A block runs on
its own from the inputs captured at the first block (hidden states and the keyword arguments the
model passes every block: attention mask, rotary embeddings), so the pass costs two block forwards
per block and task; the prefix and the suffix run the whole model (the prefix stops at the first
block). With one block and fine-tunes that differ only inside it, the Grams are RegMean's.

The Grams (one safetensors file per stage) and an index are cached under
``<cache>/regmean_pp/<key>/``; the key hashes the recipe (method, parameters, weights, layouts,
output dtype, the calibration block), the contents of the base and every model, and the texts, so a
tuning study that merges the same recipe again reads them back instead of walking the model again.
The pass runs on the CPU under :class:`~primerge.util.deterministic.ThreadIndependent`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from primerge.calibration.grams import GramFiles, Location, calibration_texts
from primerge.core.plan import Plan
from primerge.core.sources import PlanEntry, base_tensor
from primerge.core.tensor_names import prefix_map
from primerge.engine.stream import merge_tensor
from primerge.purify.covariance import InputStatistics, linear_modules, token_batches
from primerge.util.cache_dirs import cache_root
from primerge.util.deterministic import ThreadIndependent
from primerge.util.errors import InputError, RecipeError
from primerge.util.hashing import content_digest

FORMAT = 1
CPU = torch.device("cpu")
Batch = tuple[Tensor, Tensor]  # (input_ids, mask)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needs has been seen."""


def _raise_stop(module, args):
    """A forward pre-hook that ends the pass there."""
    raise _Stop


@dataclass
class BlockInput:
    """One batch at a block's input: the real-token ``mask``, the hidden states, and the other
    positional and keyword arguments the model passes every block."""

    mask: Tensor
    hidden: Tensor
    args: tuple
    kwargs: dict

    def run(self, block: nn.Module) -> Tensor:
        out = block(self.hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


@dataclass
class Stage:
    """The tensors of one stage (plan entry names) and its linear layers whose inputs are
    recorded (module name -> the entry of its weight)."""

    name: str
    entries: list[str]
    linears: dict[str, str]
    block: nn.Module | None = None  # a block of the stack; None for the prefix and the suffix


@dataclass
class Bench:
    """The working model, its parameters by plan entry (and their names in the model), its stack
    of blocks and its call options."""

    model: nn.Module
    params: dict[str, nn.Parameter]
    names: dict[str, str]
    blocks: nn.ModuleList
    blocks_name: str
    options: dict = field(default_factory=dict)

    def forward(self, batch: Batch) -> None:
        input_ids, mask = batch
        self.model(input_ids=input_ids, attention_mask=mask.long(), **self.options)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated stack of blocks: the ``nn.ModuleList`` of one module class holding the most
    parameters (``encoder.layer`` of BERT, ``layers`` of Llama)."""
    stacks = [(sum(p.numel() for p in m.parameters()), name, m) for name, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1]
    if not stacks:
        raise InputError("regmean_pp walks the model block by block, but the base model has no stack of "
                         "repeated blocks (an nn.ModuleList of one layer class); use regmean.")
    _, name, blocks = max(stacks, key=lambda s: s[0])
    return name, blocks


def open_bench(plan: Plan) -> Bench:
    """The base folder's architecture as the working model, its parameters matched to plan entries
    (one name prefix added or removed, :func:`primerge.core.tensor_names.prefix_map`)."""
    from primerge.io.hf import load_pretrained_body

    base = Path(plan.recipe.base)
    if not base.is_dir():
        raise InputError(f"{base}: regmean_pp runs the data through the merged model, so the base must be a "
                         "model folder (config.json and tokenizer), not a weights file.")
    if plan.vocabulary is not None and plan.vocabulary.changed:
        raise RecipeError("tokenizer: regmean_pp runs the data through the merged model with the base's "
                          "tokenizer; use tokenizer: base.")
    model = load_pretrained_body(base).eval()
    named = dict(model.named_parameters())
    kinds = {e.name: e.kind for e in plan.entries}
    mapping = prefix_map(list(named), set(kinds))
    if mapping is None:
        raise InputError(f"{base}: the parameters of the model transformers builds from this folder's config "
                         "are not the checkpoint's tensors (up to one name prefix); regmean_pp needs a base "
                         "folder whose config describes its weights.")
    names = {mapping[n]: n for n in named if kinds[mapping[n]] != "copy"}
    blocks_name, blocks = find_blocks(model)
    options = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    return Bench(model, {e: named[n] for e, n in names.items()}, names, blocks, blocks_name, options)


def module_of(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def prefix_modules(bench: Bench, first: Batch) -> set[str]:
    """The modules with parameters outside the stack that run before its first block (one
    forward of ``first``, stopped there)."""
    called: set[str] = set()
    handles = [module.register_forward_pre_hook(lambda m, args, name=name: called.add(name))
               for name, module in bench.model.named_modules()
               if not _inside(name, bench.blocks_name) and any(True for _ in module.parameters(recurse=False))]
    handles.append(bench.blocks[0].register_forward_pre_hook(_raise_stop))
    try:
        bench.forward(first)
    except _Stop:  # the forward pass stopped at the first block, as intended
        pass
    finally:
        for h in handles:
            h.remove()
    return called


def stages(plan: Plan, bench: Bench, first: Batch) -> list[Stage]:
    """Prefix, one stage per block, suffix: the stages in the model's order of execution. A module
    outside the stack is in the prefix when it runs before the first block (:func:`prefix_modules`),
    else in the suffix. The ``nn.Linear`` layers whose weight the plan merges as a matrix get their
    inputs recorded."""
    before = prefix_modules(bench, first)
    kinds = {e.name: e.kind for e in plan.entries}
    linears = set(linear_modules(bench.model))
    found = {"prefix": Stage("prefix", [], {})}
    found.update({f"block {i}": Stage(f"block {i}", [], {}, b) for i, b in enumerate(bench.blocks)})
    found["suffix"] = Stage("suffix", [], {})
    for entry, name in bench.names.items():
        module = module_of(name)
        if _inside(name, bench.blocks_name):
            stage = found[f"block {name[len(bench.blocks_name) + 1:].split('.', 1)[0]}"]
        else:
            stage = found["prefix" if module in before else "suffix"]
        stage.entries.append(entry)
        if module in linears and name.endswith(".weight") and kinds[entry] == "matrix":
            stage.linears[module] = entry
    return [s for s in found.values() if s.entries or s.block is not None]


def _inside(name: str, blocks_name: str) -> bool:
    return name.startswith(blocks_name + ".")


def block_inputs(bench: Bench, batches: list[Batch]) -> list[BlockInput]:
    """Each batch at the first block's input, through the (merged) prefix."""
    captured: dict[str, tuple] = {}

    def grab(module, args, kwargs):
        captured["call"] = (args, kwargs)
        raise _Stop

    handle = bench.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    out = []
    try:
        for batch in batches:
            try:
                bench.forward(batch)
            except _Stop:  # stopped at the first block once its inputs were captured
                pass
            if "call" not in captured:
                raise InputError(f"{bench.blocks_name}.0: the base model's forward pass never reached its first "
                                 "block; regmean_pp cannot walk this architecture (use regmean).")
            args, kwargs = captured.pop("call")
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            out.append(BlockInput(batch[1], hidden, tuple(args[1:]), kwargs))
    finally:
        handle.remove()
    return out


class Walk:
    """The stage-by-stage pass over one plan (module docstring)."""

    def __init__(self, plan: Plan, bench: Bench, batches: dict[str, list[Batch]], folder: Path, quiet: bool):
        self.plan, self.bench, self.batches, self.folder, self.quiet = plan, bench, batches, folder, quiet
        self.labels = list(batches)
        self.entries = {e.name: e for e in plan.entries}
        self.locations: list[dict[str, Location]] = [{} for _ in self.labels]

    def grams(self) -> GramFiles:
        return GramFiles(tuple(self.locations))

    def run(self) -> GramFiles:
        first = next(b for batches in self.batches.values() for b in batches)
        walk = stages(self.plan, self.bench, first)
        self.merge(list(self.bench.params))
        inputs: dict[str, list[BlockInput]] = {}
        for index, stage in enumerate(tqdm(walk, desc="RegMean++ stages", unit="stage", disable=self.quiet,
                                          leave=False)):
            if stage.block is not None and not inputs:
                inputs = {label: block_inputs(self.bench, self.batches[label]) for label in self.labels}
            if stage.linears:
                self.record(index, stage, inputs)
                self.merge(stage.entries)
            if stage.block is not None:
                for batch_inputs in inputs.values():
                    for item in batch_inputs:
                        item.hidden = item.run(stage.block)
        return self.grams()

    def record(self, index: int, stage: Stage, inputs: dict[str, list[BlockInput]]) -> None:
        """Every task's Grams of the stage's linear layers with the stage set to that task's own
        weights; written to the stage's file."""
        own = self.candidates(stage.entries)
        tensors: dict[str, Tensor] = {}
        keys: list[dict[str, str]] = []
        for t, label in enumerate(self.labels):
            for name, values in own.items():
                self.bench.params[name].copy_(values[t])
            stats = InputStatistics()
            with stats.hooked({m: self.bench.model.get_submodule(m) for m in stage.linears}):
                self._feed(stage, label, inputs, stats)
            keys.append({stage.linears[m]: f"{label}|{stage.linears[m]}" for m in stats.counts})
            tensors.update({f"{label}|{stage.linears[m]}": g.contiguous() for m, g in stats.second_moments().items()})
        path = self.folder / f"stage-{index:04d}.safetensors"
        save_file(tensors, str(path))
        for where, found in zip(self.locations, keys):
            where.update({name: (str(path), key) for name, key in found.items()})

    def _feed(self, stage: Stage, label: str, inputs: dict[str, list[BlockInput]], stats: InputStatistics) -> None:
        """Task ``label``'s batches through the stage: a block on its own from its inputs, the
        prefix as the model's forward up to the first block, the suffix as the whole forward."""
        if stage.block is not None:
            for item in inputs[label]:
                stats.mask = item.mask
                item.run(stage.block)
            return
        handle = self.bench.blocks[0].register_forward_pre_hook(_raise_stop) if stage.name == "prefix" else None
        try:
            for batch in self.batches[label]:
                stats.mask = batch[1]
                try:
                    self.bench.forward(batch)
                except _Stop:  # stopped after the stage whose inputs were recorded
                    pass
        finally:
            if handle is not None:
                handle.remove()

    def candidates(self, names: list[str]) -> dict[str, Tensor]:
        """θ₀ + τ_t of each tensor for every model (T, *shape), float32: the models' own weights."""
        out = {}
        for name in names:
            base, taus = self.plan.task_vectors(self.entries[name], CPU, weighted=False)
            out[name] = base + taus.dense()
        return out

    def merge(self, names: list[str]) -> None:
        """Set these tensors to their merged values, with the Grams recorded so far."""
        plan = self.plan.with_grams(self.grams())
        for name in names:
            entry = self.entries[name]
            merged = merge_tensor(plan, entry, CPU)
            self.bench.params[name].copy_(_as_float(merged, entry, self.plan))


def _as_float(merged, entry: PlanEntry, plan: Plan) -> Tensor:
    """The merged tensor as the output stores it, in float32 (θ₀ + update for a quantized output)."""
    if entry.storage is None:
        return merged.value.to(torch.float32)
    return base_tensor(plan.base, entry, CPU) + merged.update


def pass_key(plan: Plan, texts: dict[str, list[str]]) -> str:
    """SHA-256 (32 hex digits) of the recipe, the base's and every model's contents and the texts."""
    recipe = plan.recipe
    digest = hashlib.sha256(f"regmean-pp/{FORMAT}\x00{recipe.to_yaml()}".encode())
    for path in (recipe.base, *(m.path for m in recipe.models)):
        digest.update(content_digest(Path(path)).encode() + b"\x01")
    for label, items in texts.items():
        digest.update(label.encode() + b"\x02")
        for text in items:
            digest.update(text.encode() + b"\x00")
    return digest.hexdigest()[:32]


def read_index(folder: Path) -> GramFiles | None:
    """The Grams of a finished pass in ``folder`` (its ``index.json``), or None."""
    try:
        index = json.loads((folder / "index.json").read_text())
        return GramFiles(tuple({name: (str(folder / file), key) for name, (file, key) in where.items()}
                               for where in index["locations"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_index(folder: Path, grams: GramFiles) -> None:
    """``index.json``: each task's tensors -> (stage file name, key), what :func:`read_index` reads."""
    locations = [{name: [Path(file).name, key] for name, (file, key) in where.items()} for where in grams.locations]
    (folder / "index.json").write_text(json.dumps({"format": FORMAT, "locations": locations}))


def merged_grams(plan: Plan, *, cache: Path | None = None,
                 quiet: bool = True) -> GramFiles:
    """RegMean++'s Grams of ``plan`` (module docstring), from the cache when present."""
    config = plan.recipe.calibration_config
    texts = {label: calibration_texts(config, label) for label in plan.recipe.model_labels()}
    root = Path(cache or cache_root()) / "regmean_pp"
    folder = root / pass_key(plan, texts)
    found = read_index(folder)
    if found is not None:
        return found
    from primerge.io.hf import load_tokenizer

    bench = open_bench(plan)
    tokenizer = load_tokenizer(Path(plan.recipe.base))
    batches = {label: list(token_batches(tokenizer, items, config.samples, config.max_length, config.batch_size,
                                         config.template_for(label)))
               for label, items in texts.items()}
    empty = [label for label, items in batches.items() if not items]
    if empty:
        raise InputError(f"calibration.data.{empty[0]}: the task data has no texts.")
    try:
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".walk-", dir=root))
    except OSError as exc:
        raise InputError(f"{root}: cannot write RegMean++'s Gram matrices there ({exc.strerror}); "
                         "set PRIMERGE_CACHE to a writable folder.") from None
    try:
        with ThreadIndependent(), torch.no_grad():
            grams = Walk(plan, bench, batches, scratch, quiet).run()
        write_index(scratch, grams)
        os.replace(scratch, folder)
    except OSError as exc:
        if read_index(folder) is None:  # unless another process finished the same walk first
            raise InputError(f"{root}: cannot write RegMean++'s Gram matrices there ({exc.strerror}).") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return read_index(folder)
