"""Mixtures of experts assembled from a base and dense fine-tunes (mergekit-moe's construction).

Every block of the output keeps the base's attention, norms and embeddings (copied, or merged
over the models by the recipe's ``method``) and replaces the base's MLP by E experts, expert e
being block i's MLP (``gate_proj``, ``up_proj``, ``down_proj``) of expert e's model, and a router
W_i ∈ R^{E×H} whose row e is expert e's gate vector; each token goes to the ``experts_per_token``
experts of highest logit W_i x. The recipe (:class:`MoeRecipe`)::

    base: models/base
    models: [{path: models/code, name: code}, {path: models/math, name: math}]
    moe:
      gate_mode: hidden            # hidden | hidden_avg | cheap_embed | random | uniform_random
      experts_per_token: 2
      experts:
        - {model: code, positive_prompts: ["def f(x):"], negative_prompts: ["Solve 2x = 4"]}
        - {model: math, positive_prompts: ["Solve 2x = 4"], residual_scale: 0.5}
        - {model: base, positive_prompts: ["Once upon a time"]}
      shared_experts: []           # one for qwen2_moe: [{model: base, positive_prompts: [...]}]
      architecture: mixtral        # mixtral | qwen2_moe | qwen3_moe; default chosen as mergekit-moe does
    method: passthrough            # or a method: attention, norms and embeddings merged over the models
    output: {dtype: bfloat16}

**Gate vectors** (one per expert and block; W_i's rows, rows e = 1..E, then the shared expert's):

- ``hidden``: for each prompt p (the tokenizer's BOS text prepended, padded on the left with the
  BOS id), h_i(p) is block i's input at the last position when the base runs p on the CPU
  (transformers' hidden states, in ``hidden_dtype``, bfloat16 as mergekit-moe); g_i = (1/|P|) Σ_{p∈P⁺} h_i(p)
  − (1/|P⁻|) Σ_{p∈P⁻} h_i(p) (no second term without negative prompts), normalised to unit length:
  w_i = g_i / max(‖g_i‖₂, 10⁻⁸). ``hidden_avg`` averages h over the positions (padding included,
  as mergekit-moe does) instead of taking the last;
- ``cheap_embed``: the same with h(p) = Σ over p's tokens of their input embedding rows (no
  forward pass; every block gets the same vector), normalised before the difference as well;
- ``random``: N(0, 1) draws; ``uniform_random``: U(−1/√H, 1/√H) (nn.Linear's initialisation);
  both seeded by the recipe's seed.

The deterministic modes follow mergekit-moe 0.1.5's arithmetic operation for operation, so its
router weights are reproduced (benchmarks/mergekit_moe_parity.py). ``noise_scale`` adds σ·N(0, 1)
to an expert's MLP weights and ``residual_scale`` multiplies its ``down_proj`` (as mergekit-moe).

**Architectures** (the output's config is the base's with the MoE keys set):

- ``mixtral``: ``MixtralForCausalLM`` from Llama or Mistral models, experts as
  ``block_sparse_moe.experts.e.w1`` (gate), ``w2`` (down), ``w3`` (up); no shared expert;
- ``qwen2_moe``: ``Qwen2MoeForCausalLM`` from Llama, Mistral or Qwen2 models, with one shared
  expert (its MLP as ``mlp.shared_expert``, its gate vector as ``mlp.shared_expert_gate``) and
  zero q/k/v biases where the base has none;
- ``qwen3_moe``: ``Qwen3MoeForCausalLM`` from Qwen3 models, no shared expert.

Without ``architecture``: ``mixtral`` where it fits, else the first that fits (mergekit-moe's
choice). Tensors are written one by one as in any merge (:mod:`primerge.core.assembly`): each
model's MLP is read once, when its expert is written; ``hidden`` loads the base with transformers
once, when the first router is written.

mergekit-moe's configuration (``base_model``, ``experts: [{source_model, positive_prompts, ...}]``,
``gate_mode``, ``dtype``, ``experts_per_token``, ``shared_experts``, ``architecture``) translates to
this form (:func:`from_mergekit`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from primerge.core.assembly import (BASE, AssembledPlan, AssembledRecipe, Computed, Merged, Origin, TensorRef,
                                    Zeros, assembled_plan, input_config, open_inputs, tensor_info)
from primerge.core.slices import Blocks
from primerge.core.tensor_names import tensor_class
from primerge.io.files import load_json
from primerge.io.hf import load_tokenizer, transformers_module
from primerge.io.readers import Checkpoint
from primerge.util.errors import InputError, RecipeError, closest
from primerge.util.seeding import generator

GateMode = Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"]
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
RANDOM_MODES = ("random", "uniform_random")


class Expert(BaseModel):
    """One expert: ``model``'s MLPs (a model's name, or ``base``), routed to by its prompts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)
    noise_scale: float | None = Field(None, ge=0, allow_inf_nan=False)
    residual_scale: float | None = Field(None, allow_inf_nan=False)

    @field_validator("positive_prompts", "negative_prompts", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value


class MoeBlock(BaseModel):
    """The ``moe:`` block of a recipe (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    experts: list[Expert] = Field(min_length=1)
    shared_experts: list[Expert] = Field(default_factory=list, max_length=1)
    gate_mode: GateMode = "hidden"
    experts_per_token: int = Field(2, ge=1)
    architecture: str | None = None
    hidden_dtype: Literal["bfloat16", "float32"] = "bfloat16"

    @field_validator("shared_experts", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @model_validator(mode="after")
    def _routable(self) -> MoeBlock:
        if self.experts_per_token > len(self.experts):
            raise RecipeError(f"moe: experts_per_token {self.experts_per_token} exceeds the {len(self.experts)} experts.")
        if self.gate_mode in RANDOM_MODES:
            return self
        unprompted = [f"experts[{i}]" for i, e in enumerate(self.experts) if not e.positive_prompts]
        unprompted += [f"shared_experts[{i}]" for i, e in enumerate(self.shared_experts) if not e.positive_prompts]
        if unprompted:
            raise RecipeError(f"moe: {', '.join(unprompted)} have no positive_prompts, which gate_mode {self.gate_mode} "
                             f"builds their gates from; give each some, or gate_mode: random.")
        prompts = {(tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in self.experts}
        if len(self.experts) > 1 and len(prompts) == 1:
            raise RecipeError("moe: every expert has the same prompts, so every router row would be the same; give each "
                             "expert prompts of what it should receive.")
        return self

    def routed(self) -> list[Expert]:
        """The experts whose gate vectors the router computes: the experts, then the shared one."""
        return [*self.experts, *self.shared_experts]


# ------------------------------------------------------------------------------ architectures


@dataclass(frozen=True)
class Architecture:
    """An MoE output: its name (and mergekit-moe's), transformers class and ``model_type``, the
    input ``model_type`` s it is built from, whether it has one shared expert, where a block's
    MoE lives (``block``), each projection's expert name, and its config's expert-count key."""

    name: str
    mergekit_name: str
    model_class: str
    model_type: str
    inputs: tuple[str, ...]
    shared: bool
    block: str
    expert_names: Mapping[str, str]
    count_key: str
    extra_config: Mapping[str, Any] = field(default_factory=dict)

    def expert(self, prefix: str, layer: int, index: int, projection: str) -> str:
        return f"{prefix}{layer}.{self.block}.experts.{index}.{self.expert_names[projection]}.weight"

    def gate(self, prefix: str, layer: int) -> str:
        return f"{prefix}{layer}.{self.block}.gate.weight"

    def config(self, base: dict, experts: int, per_token: int) -> dict[tuple[str, ...], Any]:
        """The config.json changes that make the base's config this architecture's."""
        moe_width = ({"moe_intermediate_size": base.get("intermediate_size")} if self.name != "mixtral" else {})
        shared = {"shared_expert_intermediate_size": base.get("intermediate_size")} if self.shared else {}
        changes = {"model_type": self.model_type, "architectures": [self.model_class], self.count_key: experts,
                   "num_experts_per_tok": per_token, **moe_width, **shared, **self.extra_config}
        return {(key,): value for key, value in changes.items()}


SAME_NAMES = {p: p for p in PROJECTIONS}
ARCHITECTURES = (
    Architecture("mixtral", "Mixtral", "MixtralForCausalLM", "mixtral", ("llama", "mistral"), False,
                 "block_sparse_moe", {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}, "num_local_experts",
                 {"sliding_window": None}),
    Architecture("qwen2_moe", "Qwen MoE", "Qwen2MoeForCausalLM", "qwen2_moe", ("llama", "mistral", "qwen2"), True,
                 "mlp", SAME_NAMES, "num_experts",
                 {"decoder_sparse_step": 1, "norm_topk_prob": True, "use_sliding_window": False, "sliding_window": None,
                  "mlp_only_layers": []}),
    Architecture("qwen3_moe", "Qwen3 MoE", "Qwen3MoeForCausalLM", "qwen3_moe", ("qwen3",), False, "mlp", SAME_NAMES,
                 "num_experts", {"decoder_sparse_step": 1, "norm_topk_prob": True, "mlp_only_layers": []}),
)


def _spelled(name: str) -> str:
    return name.lower().replace(" ", "").replace("_", "")


def choose_architecture(block: MoeBlock, model_types: Mapping[str, str]) -> Architecture:
    """The output architecture (see the module docstring); ``model_types`` by input label."""
    candidates = list(ARCHITECTURES)
    if block.architecture is not None:
        wanted = _spelled(block.architecture)
        candidates = [a for a in ARCHITECTURES if _spelled(a.name).startswith(wanted)
                      or _spelled(a.mergekit_name).startswith(wanted)]
        if not candidates:
            names = [a.name for a in ARCHITECTURES]
            raise RecipeError(f"moe.architecture: '{block.architecture}' is none of {', '.join(names)}"
                              f"{closest(block.architecture, names)}")
    kinds = set(model_types.values())
    fitting = [a for a in candidates if a.shared == bool(block.shared_experts) and len(kinds) == 1
               and kinds <= set(a.inputs)]
    if not fitting:
        found = ", ".join(f"{label}: {kind}" for label, kind in model_types.items())
        shared = "one shared expert" if block.shared_experts else "no shared expert"
        raise RecipeError(f"moe: no MoE architecture is built from these models with {shared} ({found}). "
                          + "; ".join(f"{a.name} takes {'/'.join(a.inputs)} models of one kind, "
                                      f"{'one shared expert' if a.shared else 'no shared expert'}" for a in candidates))
    return fitting[0]


# ------------------------------------------------------------------------------ router


@dataclass
class Router:
    """Every block's gate vectors, computed on first use and kept (see the module docstring):
    ``gates()`` is (L, R, H), row r the gate vector of ``prompts[r]`` (positive, negative)."""

    folder: Path
    base: Checkpoint
    embedding: str
    prompts: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]
    mode: str
    hidden_dtype: str
    layers: int
    hidden: int
    vocab: int
    seed: int
    _gates: Tensor | None = None

    def gates(self) -> Tensor:
        if self._gates is None:
            self._gates = self._compute()
        return self._gates

    def _compute(self) -> Tensor:
        rows = len(self.prompts)
        if self.mode == "random":
            return torch.randn((self.layers, rows, self.hidden), generator=generator(self.seed, "router"))
        if self.mode == "uniform_random":
            bound = math.sqrt(1.0 / self.hidden)
            return torch.rand((self.layers, rows, self.hidden), generator=generator(self.seed, "router")) * 2 * bound - bound
        tokenizer = _left_padded(load_tokenizer(self.folder))
        signal = self._cheap_embedding if self.mode == "cheap_embed" else self._hidden_states()
        vectors = []
        for positive, negative in self.prompts:
            vector = signal(_batch(tokenizer, positive))
            if negative:
                vector -= signal(_batch(tokenizer, negative))
            vectors.append(vector / vector.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
        return torch.stack(vectors, dim=1)

    def _cheap_embedding(self, batch: dict[str, Tensor]) -> Tensor:
        """(L, H): Σ over the batch's tokens of their embedding rows, normalised, for every block."""
        rows = self.base.load(self.embedding).float()[batch["input_ids"]]  # = one_hot(ids) @ E, exactly
        total = (rows * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
        return (total / total.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(self.layers, 1)

    def _hidden_states(self):
        """The base as transformers runs it, and the function of a batch giving (L, H): the mean
        over prompts of block i's input at the last position (``hidden_avg``: over positions)."""
        try:
            model = transformers_module().AutoModelForCausalLM.from_pretrained(
                str(self.folder), dtype=getattr(torch, self.hidden_dtype), local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.folder}: cannot load the base with transformers for the router's hidden "
                             f"states ({exc}); use gate_mode: cheap_embed or random.") from None

        def states(batch: dict[str, Tensor]) -> Tensor:
            with torch.no_grad():
                inputs = torch.stack(model(**batch, output_hidden_states=True, return_dict=True).hidden_states[:-1])
            per_prompt = inputs.sum(dim=2) / inputs.shape[2] if self.mode == "hidden_avg" else inputs[:, :, -1, :]
            return per_prompt.sum(dim=1) / per_prompt.shape[1]

        return states

    def describe(self) -> str:
        if self.mode in RANDOM_MODES:
            return f"{self.mode} (seeded)"
        where = "embedding rows" if self.mode == "cheap_embed" else f"hidden states in {self.hidden_dtype}"
        return f"{self.mode}: {where} of {sum(len(p) + len(n) for p, n in self.prompts)} prompts through the base"


def _left_padded(tokenizer):
    """The tokenizer padding on the left with the BOS id (else EOS), as mergekit-moe pads."""
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _batch(tokenizer, prompts: tuple[str, ...]) -> dict[str, Tensor]:
    """The prompts, each after the BOS text, tokenized without other special tokens and padded."""
    encoded = tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                        add_special_tokens=False)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@dataclass(frozen=True)
class RouterRows(Computed):
    """Rows ``rows`` of block ``layer``'s gate vectors, in ``dtype``."""

    router: Router
    layer: int
    rows: tuple[int, int]
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> Tensor:
        return self.router.gates()[self.layer, self.rows[0]:self.rows[1]].to(self.dtype).contiguous()

    def describe(self) -> str:
        return self.router.describe()


# ------------------------------------------------------------------------------ recipe


class MoeRecipe(AssembledRecipe):
    """A recipe with an ``moe`` block (see the module docstring)."""

    moe: MoeBlock

    @model_validator(mode="after")
    def _experts_name_inputs(self) -> MoeRecipe:
        labels = [BASE, *self.model_labels()]
        for where, experts in (("experts", self.moe.experts), ("shared_experts", self.moe.shared_experts)):
            for i, expert in enumerate(experts):
                if expert.model not in labels:
                    raise RecipeError(f"moe.{where}[{i}]: model '{expert.model}' is not the base or a model's "
                                      f"name{closest(expert.model, labels)} (inputs: {', '.join(labels)}).")
        used = {e.model for e in self.moe.routed()}
        unused = [label for label in labels[1:] if label not in used]
        if unused:
            raise RecipeError(f"models {', '.join(unused)} are no expert; drop them or make them experts.")
        return self

    def assemble(self, shard_size: int) -> AssembledPlan:
        inputs = open_inputs(self)
        try:
            return moe_plan(self, inputs, shard_size)
        except BaseException:
            for checkpoint in inputs.values():
                checkpoint.close()
            raise


# ------------------------------------------------------------------------------ plan


def _mlp(suffix: str) -> bool:
    return suffix.startswith(".mlp.")


def _check_mlps(recipe: MoeRecipe, inputs: Mapping[str, Checkpoint], blocks: Blocks) -> None:
    """Every block's MLP is gate, up and down projections without biases, in every expert's model
    with the base's shapes."""
    base = inputs[BASE]
    for layer, names in blocks.blocks.items():
        found = sorted(s for s in names if _mlp(s))
        if found != sorted(f".mlp.{p}.weight" for p in PROJECTIONS):
            raise InputError(f"{base.path}: block {layer}'s MLP holds {', '.join(found) or 'nothing'}; an expert is "
                             f"a gate_proj/up_proj/down_proj MLP without biases (Llama, Mistral, Qwen2, Qwen3).")
    for expert in recipe.moe.routed():
        checkpoint = inputs[expert.model]
        for layer in blocks.blocks:
            for projection in PROJECTIONS:
                name = blocks.name(layer, f".mlp.{projection}.weight")
                info = tensor_info(checkpoint, expert.model, name)
                if info.shape != base.info(name).shape:
                    raise InputError(f"{info.file}: '{name}' of '{expert.model}' is {list(info.shape)}, the base's is "
                                     f"{list(base.info(name).shape)}; the experts' MLPs must have the base's shapes.")


def _expert_ref(recipe: MoeRecipe, expert: Expert, name: str) -> TensorRef:
    scale = expert.residual_scale if name.endswith("down_proj.weight") else None
    return TensorRef(expert.model, name, scale, expert.noise_scale, recipe.seed)


def _moe_origins(recipe: MoeRecipe, inputs: Mapping[str, Checkpoint], blocks: Blocks, arch: Architecture,
                 router: Router) -> dict[str, Origin]:
    """Output name -> origin, block by block: the base's other tensors, the experts, the routers."""
    base = inputs[BASE]
    dtype = base.info(router.embedding).dtype
    experts, shared = recipe.moe.experts, recipe.moe.shared_experts

    def outside(name: str) -> Origin:
        if not recipe.merges or not base.info(name).dtype.is_floating_point:
            return TensorRef(BASE, name)
        return Merged(TensorRef(BASE, name), {label: name for label in recipe.model_labels()})

    origins: dict[str, Origin] = {n: outside(n) for n in blocks.outside if tensor_class(n) == "embed"}
    for layer, names in sorted(blocks.blocks.items()):
        origins.update({name: outside(name) for suffix, name in names.items() if not _mlp(suffix)})
        if arch.shared:
            origins.update(_zero_biases(names, base, layer, blocks, dtype))
        for e, expert in enumerate(experts):
            for projection in PROJECTIONS:
                source = blocks.name(layer, f".mlp.{projection}.weight")
                origins[arch.expert(blocks.prefix, layer, e, projection)] = _expert_ref(recipe, expert, source)
        origins[arch.gate(blocks.prefix, layer)] = RouterRows(router, layer, (0, len(experts)),
                                                              (len(experts), router.hidden), dtype)
        for expert in shared:
            for projection in PROJECTIONS:
                source = blocks.name(layer, f".mlp.{projection}.weight")
                origins[blocks.name(layer, f".mlp.shared_expert.{projection}.weight")] = _expert_ref(recipe, expert, source)
            origins[blocks.name(layer, ".mlp.shared_expert_gate.weight")] = RouterRows(
                router, layer, (len(experts), len(experts) + 1), (1, router.hidden), dtype)
    origins.update({n: outside(n) for n in blocks.outside if n not in origins})
    return origins


def _zero_biases(names: Mapping[str, str], base: Checkpoint, layer: int, blocks: Blocks, dtype: torch.dtype
                 ) -> dict[str, Origin]:
    """Qwen2-MoE's q/k/v biases, zero where the base (a Llama or Mistral) has none."""
    zeros: dict[str, Origin] = {}
    for projection in ("q_proj", "k_proj", "v_proj"):
        name = blocks.name(layer, f".self_attn.{projection}.bias")
        if name not in base:
            rows = base.info(blocks.name(layer, f".self_attn.{projection}.weight")).shape[0]
            zeros[name] = Zeros((rows,), dtype)
    if any(s.endswith(".bias") and "o_proj" in s for s in names):
        raise InputError(f"{base.path}: block {layer} has an o_proj bias, which Qwen2-MoE does not hold.")
    return zeros


def _refuse_biases(arch: Architecture, base: Checkpoint, blocks: Blocks) -> None:
    """Mixtral and Qwen3-MoE attention has no biases: a base with some cannot become one."""
    biased = [n for names in blocks.blocks.values() for s, n in names.items() if s.endswith(".bias")]
    if biased and not arch.shared:
        raise InputError(f"{base.path}: '{biased[0]}' is a bias, which {arch.model_class} does not hold; choose "
                         f"architecture: qwen2_moe (with one shared expert).")


def _model_types(recipe: MoeRecipe, inputs: Mapping[str, Checkpoint]) -> dict[str, str]:
    labels = [BASE, *dict.fromkeys(e.model for e in recipe.moe.routed())]
    return {label: str(load_json(input_config(inputs[label], label), "config.json").get("model_type"))
            for label in labels}


def _describe(recipe: MoeRecipe, arch: Architecture, config: dict, router: Router, inputs: Mapping[str, Checkpoint]
              ) -> tuple[list[str], str]:
    """The plan's lines about the output and the card's expert map."""
    moe = recipe.moe
    rows = [(f"expert {e}", expert) for e, expert in enumerate(moe.experts)]
    rows += [("shared expert", expert) for expert in moe.shared_experts]
    kept = f"merged by {recipe.method} over {', '.join(recipe.model_labels())}" if recipe.merges else "the base's"
    lines = [f"{arch.model_class}: {config.get('num_hidden_layers')} blocks, {len(moe.experts)} experts "
             f"({moe.experts_per_token} per token){', 1 shared expert' if moe.shared_experts else ''}",
             *(f"{what}: the MLPs of {e.model} ({len(e.positive_prompts)} positive, {len(e.negative_prompts)} "
               f"negative prompts{_scales(e)})" for what, e in rows),
             f"router: {router.describe()}", f"attention, norms, embeddings and head: {kept}"]
    if moe.gate_mode.startswith("hidden"):
        weights = sum(math.prod(inputs[BASE].info(n).shape) for n in inputs[BASE].names)
        itemsize = torch.empty((), dtype=getattr(torch, moe.hidden_dtype)).element_size()
        lines.append(f"the router's hidden states load the base with transformers once (~{weights * itemsize / 2**20:.1f} "
                     f"MiB in {moe.hidden_dtype}, beside the merge's memory)")
    if len({e.model for e in moe.experts}) == 1 and len(moe.experts) > 1:
        lines.append("every expert is the same model: they compute one function until trained")
    table = "\n".join(f"| {what} | `{e.model}` | {len(e.positive_prompts)} / {len(e.negative_prompts)} |{_scales(e)} |"
                      for what, e in rows)
    card = (f"## Expert map\n\n{arch.model_class}, {len(moe.experts)} experts, {moe.experts_per_token} per token. "
            f"Every block's MLP i of expert e is block i's MLP of its model; the router's row e is its gate vector "
            f"({router.describe()}). Attention, norms, embeddings and head: {kept}.\n\n"
            f"| expert | MLPs of | prompts (positive / negative) | scales |\n|---|---|---|---|\n{table}\n")
    return lines, card


def _scales(expert: Expert) -> str:
    given = {"noise_scale": expert.noise_scale, "residual_scale": expert.residual_scale}
    return "".join(f", {k} {v}" for k, v in given.items() if v is not None)


def moe_plan(recipe: MoeRecipe, inputs: Mapping[str, Checkpoint], shard_size: int) -> AssembledPlan:
    """The plan of a mixture of experts (see the module docstring)."""
    arch = choose_architecture(recipe.moe, _model_types(recipe, inputs))
    base = inputs[BASE]
    blocks = Blocks.of(base)
    if not blocks.blocks:
        raise InputError(f"{base.path}: the base has no transformer blocks; an MoE replaces each block's MLP.")
    _check_mlps(recipe, inputs, blocks)
    _refuse_biases(arch, base, blocks)
    config = load_json(input_config(base, BASE), "config.json")
    embedding = next((n for n in blocks.outside if n.endswith("embed_tokens.weight")), None)
    if embedding is None:
        raise InputError(f"{base.path}: no input embedding (…embed_tokens.weight) among the base's tensors.")
    router = Router(base.folder, base, embedding, tuple((tuple(e.positive_prompts), tuple(e.negative_prompts))
                                                        for e in recipe.moe.routed()),
                    recipe.moe.gate_mode, recipe.moe.hidden_dtype, len(blocks.blocks), base.info(embedding).shape[1],
                    base.info(embedding).shape[0], recipe.seed)
    origins = _moe_origins(recipe, inputs, blocks, arch, router)
    architecture, card = _describe(recipe, arch, config, router, inputs)
    return assembled_plan(recipe, inputs, origins,
                          config=arch.config(config, len(recipe.moe.experts), recipe.moe.experts_per_token),
                          notes=[], architecture=architecture, map_section=card, shard_size=shard_size)


# ------------------------------------------------------------------------------ mergekit

MERGEKIT_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                   "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


def is_mergekit_moe(data: object) -> bool:
    """Whether ``data`` is a mergekit-moe configuration (``base_model`` and ``experts`` at the top)."""
    return isinstance(data, dict) and "base_model" in data and "experts" in data and "moe" not in data


def from_mergekit(config: Mapping[str, Any]) -> dict[str, Any]:
    """A mergekit-moe configuration as a primerge MoE recipe (the module docstring's form): the
    experts' and shared experts' models become ``models`` (each named after its path's last part;
    ``base_model`` is ``base``), ``dtype`` becomes ``output.dtype``. Relative paths stay as written
    (a recipe file resolves them against its folder)."""
    known = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise RecipeError(f"mergekit-moe configuration: unknown field '{unknown[0]}'{closest(unknown[0], known)} "
                          f"(fields: {', '.join(sorted(known))}).")
    base = config.get("base_model")
    if not isinstance(base, str) or not base:
        raise RecipeError("mergekit-moe configuration: base_model must name the base model's path or hub id.")
    labels: dict[str, str] = {base: BASE}

    def expert(raw: object, where: str) -> dict[str, Any]:
        if not isinstance(raw, dict) or not isinstance(raw.get("source_model"), str):
            raise RecipeError(f"mergekit-moe configuration: {where} needs source_model (a path or hub id).")
        path = raw["source_model"]
        if path not in labels:
            stem, k = Path(path.split("@")[0]).name or "model", 2
            label = stem
            while label in labels.values():
                label, k = f"{stem}-{k}", k + 1
            labels[path] = label
        return {"model": labels[path], **{k: v for k, v in raw.items() if k != "source_model"}}

    experts = config.get("experts")
    if not isinstance(experts, list):
        raise RecipeError("mergekit-moe configuration: experts must be a list of {source_model, positive_prompts}.")
    moe = {"experts": [expert(e, f"experts[{i}]") for i, e in enumerate(experts)],
           "shared_experts": [expert(e, f"shared_experts[{i}]") for i, e in enumerate(config.get("shared_experts") or [])],
           **{k: config[k] for k in ("gate_mode", "experts_per_token", "architecture") if config.get(k) is not None}}
    recipe: dict[str, Any] = {"base": base, "models": [{"path": p, "name": n} for p, n in labels.items() if n != BASE],
                              "moe": moe}
    if config.get("dtype") is not None:
        if str(config["dtype"]) not in MERGEKIT_DTYPES:
            raise RecipeError(f"mergekit-moe configuration: dtype '{config['dtype']}' is none of "
                              f"{', '.join(MERGEKIT_DTYPES)}.")
        recipe["output"] = {"dtype": MERGEKIT_DTYPES[str(config["dtype"])]}
    return recipe
