"""mergekit configurations as primerge recipes: detection, translation, and where semantics differ.

:func:`recipe_data` reads a recipe file's text: primerge's YAML, a mergekit configuration
(a mapping with ``merge_method``), or a model card (``.md``) embedding either in a fenced
``yaml`` block — the first block that is a recipe. A mergekit configuration becomes the native
mapping :func:`translate_config` writes, with ``origin`` holding the original text and the notes
on every place where primerge's semantics differ (``primerge plan`` prints them, the model card
keeps them). What primerge cannot honour is refused in one line naming the key.

The translation, key by key (mergekit 0.1.5):

- ``merge_method`` → :data:`PEERS`: the primerge method, what it does with ``base_model``
  (``required``; ``optional``: with one the methods interpolate task vectors, ``space:
  task_vectors``, without one the weights, with the first model as primerge's reference base;
  ``joins``: mergekit merges the base as one more input, so it is listed under ``models`` too), and
  the parameters mergekit's defaults need. ``ties``, ``task_arithmetic``, ``breadcrumbs`` and
  ``della`` keep the papers' definitions in primerge; their mergekit meaning comes from
  :func:`primerge.methods.mergekit_names.translate`, applied to every value a setting writes.
- ``models[].model`` / ``parameters`` → ``models[].path`` / ``parameters`` (the base dropped from
  them where it is the reference), ``parameters`` → ``parameters``: the settings language is the
  same (scalars, gradients, ``{filter, value}`` lists; :mod:`primerge.core.parameters`). mergekit
  ignores a merge-wide parameter given per model and a parameter its method lacks: both are dropped
  with a note.
- ``slices``: one output slice whose sources all span the same layers from 0 is the same merge
  (its parameters rank between the models' and the recipe's: their rules come first); the layer
  count is checked against the base when the plan is built. Other slices re-assemble layers: they
  become a slices recipe (:func:`primerge.core.slices.from_mergekit`), copied block for block by
  ``passthrough`` or merged by the method. ``modules`` are refused.
- A mergekit-moe configuration (``base_model`` and ``experts``) becomes a MoE recipe
  (:func:`primerge.core.moe.from_mergekit`).
- ``dtype`` / ``out_dtype`` → ``output.dtype`` (``out_dtype``, else ``dtype``); primerge computes
  in float32 whatever ``dtype`` says.
- ``tokenizer_source`` / ``tokenizer: {source, pad_to_multiple_of}`` → ``tokenizer``;
  ``chat_template`` → ``chat_template``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from primerge.core.parameters import WEIGHT, per_task_fields
from primerge.io.files import parse_yaml
from primerge.methods import get_method
from primerge.methods.mergekit_names import MERGEKIT_METHODS, translate
from primerge.util.errors import RecipeError
from primerge.util.schema import accepted_names

BasePolicy = Literal["required", "optional", "joins"]

RANDOM = ("random masks: {method} draws its masks from primerge's generator, seeded per tensor from the recipe's "
          "seed; they follow mergekit's distribution but cannot match its draws bit for bit")
ZERO_SIGN = ("sign election: where the summed task vectors are exactly 0 mergekit elects +1, primerge 0; the results "
             "differ only where the task vectors cancel exactly")


@dataclass(frozen=True)
class Peer:
    """How a mergekit method runs in primerge: the ``method``, its ``base`` policy, the primerge
    parameters mergekit's defaults need (``fixed``), whether its values go through
    :func:`~primerge.methods.mergekit_names.translate` (``mapped``), whether it has a ``space``
    parameter set by the presence of a base, its semantic ``notes``, and whether mergekit's method
    reads the models' ``weights`` at all (where it does not, a ``weight`` is dropped)."""

    method: str
    base: BasePolicy = "required"
    fixed: tuple[tuple[str, Any], ...] = ()
    mapped: bool = False
    space: bool = False
    notes: tuple[str, ...] = ()
    weights: bool = True


PEERS: dict[str, Peer] = {
    "linear": Peer("linear", "joins"),
    "task_arithmetic": Peer("task_arithmetic", mapped=True),
    "ties": Peer("ties", mapped=True, notes=(ZERO_SIGN,)),
    "dare_ties": Peer("dare_ties", notes=(RANDOM, ZERO_SIGN)),
    "dare_linear": Peer("dare_linear", notes=(RANDOM,)),
    "breadcrumbs": Peer("breadcrumbs", mapped=True),
    "breadcrumbs_ties": Peer("breadcrumbs_ties", notes=(ZERO_SIGN,)),
    "della": Peer("della", mapped=True, notes=(RANDOM, ZERO_SIGN)),
    "della_linear": Peer("della_linear", notes=(RANDOM,)),
    "slerp": Peer("slerp", weights=False),
    "nuslerp": Peer("nuslerp", "optional", space=True),
    "multislerp": Peer("multislerp", "optional", space=True),
    "karcher": Peer("karcher", "joins", fixed=(("space", "weights"),), weights=False),
    "model_stock": Peer("model_stock", weights=False),
    "sce": Peer("sce", fixed=(("weight_floor", 1e-6),), notes=(ZERO_SIGN,), weights=False),
    "nearswap": Peer("nearswap", weights=False),
    "arcee_fusion": Peer("arcee_fusion", weights=False, notes=("arcee_fusion: mergekit estimates the quartiles of a tensor of more "
                                                "than 10^6 entries from 10^6 random draws; primerge computes them exactly",)),
}
#: mergekit methods primerge refuses, and why.
UNSUPPORTED = {
    "passthrough": "it copies layers: give slices (layer ranges) to stack them",
    "ram": "primerge has no RAM method",
    "ramplus_tl": "primerge has no RAM+ method",
}
#: Top-level keys of a mergekit configuration primerge reads.
KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
        "tokenizer", "chat_template")
DTYPES = ("bfloat16", "float16", "float32", "float64")


def is_mergekit(data: Any) -> bool:
    """Whether ``data`` is a mergekit configuration (it names a ``merge_method``)."""
    return isinstance(data, dict) and "merge_method" in data


# ----------------------------------------------------------------------------------- reading


FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})[ \t]*(?:yaml|yml)[ \t]*\n(?P<body>.*?)^(?P=fence)[ \t]*$",
                   re.MULTILINE | re.DOTALL)


def card_blocks(text: str) -> list[str]:
    """The fenced ``yaml`` blocks of a Markdown text, in order."""
    return [m.group("body") for m in FENCE.finditer(text)]


def _is_recipe(data: Any) -> bool:
    return is_mergekit(data) or (isinstance(data, dict) and "base" in data and "models" in data)


def recipe_data(raw: bytes, path: Path) -> Any:
    """The recipe mapping held by a file's bytes (see the module docstring); mergekit translated."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: the recipe is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    if path.suffix.lower() in (".md", ".markdown"):
        found = [(b, d) for b in card_blocks(text) if _is_recipe(d := parse_yaml(b, path, "recipe", RecipeError))]
        if not found:
            raise RecipeError(f"{path}: no ```yaml block of this card holds a primerge recipe or a mergekit "
                              f"configuration (merge_method: ...).")
        text, data = found[0]
    else:
        data = parse_yaml(text, path, "recipe", RecipeError)
    from primerge.core import moe  # the assembled recipes import the recipe, which imports this module

    if moe.is_mergekit_moe(data):
        return moe.from_mergekit(data)
    if not is_mergekit(data):
        return data
    try:
        return translate_config(data, text=text, file=str(path))
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None


# ----------------------------------------------------------------------------------- settings


def _rules(raw: Any) -> list[Any]:
    """A setting as a list of ``{filter, value}`` rules (a scalar or gradient: one rule for every tensor)."""
    if isinstance(raw, dict):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(r, dict) for r in raw):
        return list(raw)
    return [{"value": raw}]


def _before(first: Any, then: Any) -> Any:
    """One setting: ``first``'s rules, then ``then``'s where none of them matches (precedence)."""
    return _rules(first) + _rules(then)


def _scalar(raw: Any) -> bool:
    return isinstance(raw, (bool, int, float, str))


def _mapped(raw: Any, fn) -> Any:
    """``raw`` with ``fn`` applied to every value it writes (scalars, gradient anchors, rule values)."""
    if isinstance(raw, dict):
        return {**raw, "value": _mapped(raw.get("value"), fn)}
    if isinstance(raw, list):
        return [_mapped(r, fn) for r in raw]
    return fn(raw) if _scalar(raw) else raw


@dataclass
class Notes:
    """The notes of one translation, in the order they arise."""

    lines: list[str]

    def add(self, line: str) -> None:
        if line not in self.lines:
            self.lines.append(line)


class Parameters:
    """mergekit's parameter names and values for ``name``, as primerge's for the peer's method."""

    def __init__(self, name: str, peer: Peer, notes: Notes):
        self.name, self.peer, self.notes = name, peer, notes
        spec = get_method(peer.method)
        self.model = MERGEKIT_METHODS[name] if peer.mapped else spec.params_model
        self.fields = accepted_names(self.model)
        self.per_model = per_task_fields(self.model)

    def _field(self, key: str, where: str) -> str | None:
        if key in self.fields:
            return self.fields[key]
        if key == "int8_mask":
            self.notes.add(f"{where}.int8_mask: only changes mergekit's mask memory; ignored")
        else:
            self.notes.add(f"{where}.{key}: mergekit's {self.name} has no such parameter (mergekit ignores it): dropped")
        return None

    def shared(self, given: dict[str, Any]) -> dict[str, Any]:
        """The recipe-level parameters: mergekit's defaults made explicit, values mapped."""
        known = {f: raw for key, raw in given.items() if key != WEIGHT and (f := self._field(key, "parameters"))}
        self.uniform = {f: raw for f, raw in known.items() if _scalar(raw)}
        out = dict(translate(self.name, self.uniform)[1]) if self.peer.mapped else dict(self.uniform)
        for field, raw in known.items():
            if not _scalar(raw):
                out[field] = self._values(field, raw, {})
        out.update({k: v for k, v in self.peer.fixed if k not in out})
        if WEIGHT in given and self._weighted("parameters"):
            out[WEIGHT] = given[WEIGHT]
        self.translated = out
        return out

    def _weighted(self, where: str) -> bool:
        """Whether mergekit's method reads ``weight``; a note where it does not."""
        if not self.peer.weights:
            self.notes.add(f"{where}.weight: mergekit's {self.name} has no weights (mergekit ignores it): dropped")
        return self.peer.weights

    def model_settings(self, label: str, given: dict[str, Any]) -> dict[str, Any]:
        """One model's parameters: ``weight`` and the per-model ones; merge-wide ones dropped."""
        where = f"models '{label}': parameters"
        out = {}
        own = {k: v for k, v in given.items() if k != WEIGHT and _scalar(v)}
        for key, raw in given.items():
            if key == WEIGHT:
                if self._weighted(where):
                    out[WEIGHT] = raw
            elif (field := self._field(key, where)) is not None and field not in self.per_model:
                self.notes.add(f"{where}.{key}: one value for the whole merge in mergekit (its per-model value "
                               f"is ignored): dropped")
            elif field is not None:
                out[field] = self._values(field, raw, {self.fields[k]: v for k, v in own.items() if k in self.fields})
        return {**self._coupled({self.fields[k]: v for k, v in own.items() if k in self.fields}, out), **out}

    def _coupled(self, own: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        """The per-model values mergekit's translation gives this model's own scalars where they differ
        from the recipe-level ones (DELLA: ε is 0 where density is 1, so a model's density moves its ε)."""
        if not self.peer.mapped or not own:
            return {}
        full = translate(self.name, {**self.uniform, **own})[1]
        return {f: full[f] for f in self.per_model if f not in given and f in full
                and _scalar(self.translated.get(f)) and full[f] != self.translated.get(f)}

    def _values(self, field: str, raw: Any, context: dict[str, Any]) -> Any:
        """``raw`` with each value mapped through the mergekit method's translation (``mapped``
        peers), the other parameters at their scalar values (``context``: the model's own first)."""
        if not self.peer.mapped:
            return raw
        return _mapped(raw, lambda v: translate(self.name, {**self.uniform, **context, field: v})[1][field])


# ----------------------------------------------------------------------------------- models


def model_reference(value: Any, where: str) -> str:
    """A model reference (path or hub id, ``@revision`` allowed) as text."""
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where}: a model is a path or a hub id (org/name[@revision]), not {value!r:.60}.")
    if "+" in value:
        raise RecipeError(f"{where}: '{value[:80]}' applies a LoRA to a model first; merge the adapter into that "
                          f"model, or list the adapter folder itself as a model.")
    return value


def _inputs(data: dict[str, Any], notes: Notes) -> tuple[list[dict[str, Any]], Any, Any, int | None]:
    """(models as {model, parameters}, base_model, slice parameters, layer count from slices)."""
    if data.get("modules"):
        raise RecipeError("modules: multi-module merges are not supported by primerge; merge each module's "
                          "models with its own recipe.")
    if data.get("models") and data.get("slices"):
        raise RecipeError("models and slices: give one of them (mergekit refuses both too).")
    if data.get("models"):
        models = data["models"]
        if not isinstance(models, list):
            raise RecipeError("models: a list of {model: PATH, parameters: {...}}.")
        return [m if isinstance(m, dict) else {"model": m} for m in models], data.get("base_model"), None, None
    slices = data.get("slices")
    if not isinstance(slices, list) or not slices:
        raise RecipeError("a mergekit configuration needs models (or slices).")
    layers = _whole_model_layers(slices)
    sources = slices[0]["sources"]
    notes.add(f"slices: one slice over layers [0, {layers}] of every model: merged as whole models")
    base = slices[0].get("base_model") or data.get("base_model")
    models = [{"model": s.get("model"), "parameters": s.get("parameters")} for s in sources]
    return models, base, slices[0].get("parameters"), layers


def _layout(peer: Peer, name: str, models: list[dict[str, Any]], base: str | None, notes: Notes
            ) -> tuple[str, list[dict[str, Any]], bool]:
    """(primerge's base, the models it merges, whether mergekit has a base) for the peer's policy."""
    if base is None and peer.base == "required":
        raise RecipeError(f"merge_method {name} needs base_model (mergekit refuses it without one too).")
    if base is None:
        return models[0]["model"], models, False
    listed = [m for m in models if m["model"] == base]
    if peer.base == "joins":
        if not listed:
            notes.add(f"base_model joins the {name} merge as one more input, as mergekit adds it")
        return base, models if listed else [*models, {"model": base}], True
    if any(m.get("parameters") for m in listed):
        notes.add("the base model's own parameters are ignored (it is the reference, as in mergekit)")
    return base, [m for m in models if m["model"] != base], True


def _tokenizer(data: dict[str, Any], base: str, refs: list[str], notes: Notes) -> tuple[Any, str | None]:
    """(the native tokenizer setting or ``None``, the reference of a model to name after it)."""
    config = data.get("tokenizer")
    source = data.get("tokenizer_source")
    if config is not None and source is not None:
        raise RecipeError("tokenizer_source and tokenizer: give one of them (mergekit refuses both too).")
    options: dict[str, Any] = {}
    if isinstance(config, dict):
        if config.get("tokens"):
            raise RecipeError("tokenizer.tokens: per-token embedding sources are not supported by primerge; remove "
                              "them (tokens the models lack are then aligned by primerge's rules).")
        unknown = set(config) - {"source", "tokens", "pad_to_multiple_of"}
        if unknown:
            raise RecipeError(f"tokenizer.{sorted(unknown)[0]}: not a key of mergekit's tokenizer block.")
        source = config.get("source", "union")
        if config.get("pad_to_multiple_of"):
            options["pad_to_multiple_of"] = config["pad_to_multiple_of"]
            notes.add("tokenizer.pad_to_multiple_of: the padding rows are the tokenizer source's (zero where it has "
                      "none); mergekit fills them with the mean of the token rows")
    elif config is not None:
        raise RecipeError("tokenizer: a mapping {source, pad_to_multiple_of}.")
    if source is None:
        return ({"source": "base", **options} if options else None), None
    named = None
    if source not in ("base", "union"):
        source = model_reference(source, "tokenizer_source")
        if source == base:
            source = "base"
        elif source in refs:
            named = source
        else:
            raise RecipeError(f"tokenizer_source '{source[:80]}' is neither base, union, the base model nor one of "
                              f"the models.")
    notes.add("vocabulary, where the models' tokenizers differ: a token row a model lacks gets no task vector in "
              "primerge (the row merges the models that have it); mergekit gives that model a stand-in row (the "
              "base's, a donor's or a mean) that then enters the merge")
    value = _label(named) if named else source
    return ({"source": value, **options} if options else value), named


def _label(reference: str) -> str:
    return Path(reference).name or reference


# ----------------------------------------------------------------------------------- translation


def _whole_model_layers(slices: list[Any]) -> int | None:
    """L when ``slices`` is one slice whose sources all span layers [0, L] (the same merge as whole
    models), else None."""
    sources = slices[0].get("sources") if len(slices) == 1 and isinstance(slices[0], dict) else None
    ranges = {tuple(s.get("layer_range") or ()) for s in sources or [] if isinstance(s, dict)}
    if not sources or len(ranges) != 1 or len(next(iter(ranges))) != 2 or next(iter(ranges))[0] != 0:
        return None
    return next(iter(ranges))[1]


def _sliced(data: dict[str, Any], notes: Notes) -> dict[str, Any]:
    """A slices recipe (:func:`primerge.core.slices.from_mergekit`); a method other than passthrough
    merges each multi-source slice, with the configuration's parameters translated."""
    from primerge.core import slices  # the assembled recipes import the recipe, which imports this module

    recipe = slices.from_mergekit(data)
    name = data["merge_method"]
    if name != slices.PASSTHROUGH:
        peer = _peer(name)
        recipe["method"] = peer.method
        recipe["parameters"] = Parameters(name, peer, notes).shared(dict(data.get("parameters") or {}))
    elif data.get("parameters"):
        notes.add("parameters: passthrough merges nothing; a slice source's scale is its only parameter")
    return recipe


def _peer(name: str) -> Peer:
    if name in UNSUPPORTED:
        raise RecipeError(f"merge_method {name}: {UNSUPPORTED[name]}.")
    if name not in PEERS:
        raise RecipeError(f"merge_method {name!r:.60}: not a mergekit method primerge runs ({', '.join(PEERS)}).")
    return PEERS[name]


def _output_dtype(data: dict[str, Any], notes: Notes) -> dict[str, str] | None:
    """``output`` for ``out_dtype`` / ``dtype`` (see the module docstring), with the compute note."""
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise RecipeError(f"{'out_dtype' if data.get('out_dtype') else 'dtype'}: {dtype!r:.40} is not one of "
                          f"{', '.join(DTYPES)}.")
    if data.get("dtype") not in (None, "float32", "float64"):
        notes.add(f"dtype {data['dtype']}: mergekit computes in {data['dtype']}; primerge computes in float32 and "
                  f"stores {dtype}: results agree to {dtype} rounding, not bit for bit")
    return {"dtype": dtype}


def translate_config(data: dict[str, Any], *, text: str = "", file: str | None = None) -> dict[str, Any]:
    """The native recipe mapping of a mergekit configuration (see the module docstring)."""
    notes = Notes([])
    for key in data:
        if key not in (*KEYS, "modules"):
            notes.add(f"{key}: not read by mergekit's merge either: ignored")
    if isinstance(data.get("slices"), list) and data["slices"] and not data.get("models") \
            and _whole_model_layers(data["slices"]) is None:
        recipe = _sliced(data, notes)
        if (output := _output_dtype(data, notes)) is not None:
            recipe["output"] = output
        recipe["origin"] = {"format": "mergekit", "file": file, "text": text, "notes": notes.lines, "layers": None}
        return recipe
    name = data["merge_method"]
    peer = _peer(name)
    models, base, slice_parameters, layers = _inputs(data, notes)
    for i, model in enumerate(models):
        model["model"] = model_reference(model.get("model"), f"models[{i}].model")
    base = None if base is None else model_reference(base, "base_model")
    base_path, models, has_base = _layout(peer, name, models, base, notes)
    parameters = dict(data.get("parameters") or {})
    for key, raw in (slice_parameters or {}).items():
        parameters[key] = _before(raw, parameters[key]) if key in parameters else raw
    translator = Parameters(name, peer, notes)
    native = translator.shared(parameters)
    if peer.space:
        native["space"] = "task_vectors" if has_base else "weights"
    refs = [m["model"] for m in models]
    tokenizer, named = _tokenizer(data, base_path, refs, notes)
    entries = []
    for model in models:
        label = _label(model["model"])
        settings = translator.model_settings(label, dict(model.get("parameters") or {}))
        entry = {"path": model["model"], **({"parameters": settings} if settings else {})}
        entries.append({**entry, "name": label} if model["model"] == named else entry)
    recipe: dict[str, Any] = {"base": base_path, "models": entries, "method": peer.method, "parameters": native}
    if tokenizer is not None:
        recipe["tokenizer"] = tokenizer
    if data.get("chat_template") is not None:
        recipe["chat_template"] = data["chat_template"]
        notes.add("chat_template: primerge also makes eos_token and generation_config's eos_token_id agree with the "
                  "template's end-of-turn token (mergekit writes the template only)")
    if (output := _output_dtype(data, notes)) is not None:
        recipe["output"] = output
    for note in peer.notes:
        notes.add(note.format(method=name))
    recipe["origin"] = {"format": "mergekit", "file": file, "text": text, "notes": notes.lines, "layers": layers}
    return recipe
