"""How much memory merging one tensor holds at its peak: the working set pre-flight adds to the
baseline and the output's buffer (:func:`primerge.engine.preflight.peak_memory`).

A tensor of N elements merged from T models holds, at its peak, some float32 copies of the tensor:
θ₀, the T task vectors (or their running sum), a model's tensor as read and its float32 copy, the
method's own temporaries (masks, trimmed copies, signs; an SVD method's factors, workspaces and
concatenated bases, each O(N) because every factor of an m × n matrix has at most m·n entries), the
update and θ₀ + update. That count is affine in T: the working set is

    4·N·(a + b·T + r)   bytes

with (a, b) per method (:data:`COPIES`) and r the copies reading adds for how the inputs store the
tensor (:func:`reading_copies`: a 16-bit tensor's float32 copy; FP8's float32 values, expanded
scales and product; a vocabulary-aligned tensor's rows gathered from the base and every model; a
LoRA input's dense product).
A whole-model pre-pass (TIES ``trim_scope: model``, PRIME ``rank: auto``, EMR) observes one tensor
at a time with the same stack, so its peak is within the same count (its statistics are bounded
by construction, e.g. TIES's at most 2^17 values per task).

The (a, b) of a method are its copies at its peak counted as T varies, measured with the allocator
returning every large block at once (so resident memory is live memory), with 25 % more and two
copies more for what another matrix shape, LAPACK or thread count allocates (an SVD's factors of an
m × n matrix hold k(m + n) ≤ 2·m·n entries; 768 × 512, where they were counted, has 1.67·m·n).
A method not in the table gets its family's largest (:data:`FAMILY_COPIES`).
tests/test_reliability_memory.py measures every registered method, every treatment and input kind
in a subprocess and checks the measured peak against the estimate, so a method whose working set
outgrows its entry fails there, by name.
"""

from __future__ import annotations

#: (a, b): float32 copies of the tensor a method's merge holds at its peak, a + b·T (module docstring).
COPIES: dict[str, tuple[float, float]] = {
    "task_arithmetic": (8, 0.5), "linear": (7, 0.5), "model_stock": (6, 1.5),
    "ties": (13, 1.5), "dare": (5, 4), "dare_linear": (4, 4), "dare_ties": (10, 3.5),
    "della": (4, 6.5), "della_linear": (4, 6.5), "breadcrumbs": (3, 6.5), "breadcrumbs_ties": (12, 3),
    "consensus": (5, 5), "sce": (5, 5.5), "multislerp": (5, 5), "karcher": (9, 4), "emr": (8, 5.5),
    "tsv": (14, 5.5), "prime": (14, 6.5), "iso_c": (15, 1.5), "iso_cts": (3, 10.5),
    "subspace_boosting": (15, 1.5), "drm": (7, 9), "ho_subspace_boosting": (21, 18), "wudi": (18, 1.5),
    "knots": (13, 5), "core_space": (25, 12.5),
}
#: (a, b) of a method not in :data:`COPIES`: the largest of its family's entries.
FAMILY_COPIES: dict[str, tuple[float, float]] = {
    family: (max(a for name, (a, _) in COPIES.items() if name in members),
             max(b for name, (_, b) in COPIES.items() if name in members))
    for family, members in {
        "elementwise": {"task_arithmetic", "linear", "model_stock", "ties", "dare", "dare_linear", "dare_ties", "della",
                        "della_linear", "breadcrumbs", "breadcrumbs_ties", "consensus", "sce", "multislerp",
                        "karcher", "emr"},
        "svd": {"tsv", "prime", "iso_c", "iso_cts", "subspace_boosting", "drm", "ho_subspace_boosting", "wudi",
                "knots", "core_space"}}.items()
}
#: Copies reading adds: a 16-bit tensor's float32 copy (1/2 of a float32 copy beyond the raw bytes
#: the table counts); an FP8 tensor's float32 values, expanded scales and their product (3); the
#: rows of a vocabulary-aligned tensor gathered from the base and each model (3); a LoRA input's
#: product B·A formed in float32 where the method reads dense task vectors (1).
SIXTEEN_BIT, FP8, VOCABULARY, FACTORED = 0.5, 3.0, 3.0, 1.0


def method_copies(name: str, family: str, tasks: int) -> float:
    """a + b·T for method ``name`` of ``family`` merging ``tasks`` models."""
    a, b = COPIES.get(name) or FAMILY_COPIES.get(family, FAMILY_COPIES["svd"])
    return a + b * tasks


def reading_copies(itemsizes: list[int], quantized: bool, aligned: bool, factored: bool = False) -> float:
    """r: the copies reading adds for inputs storing the tensor with ``itemsizes`` (bytes per element),
    any of them FP8 block-scaled (``quantized``), its rows aligned by token string (``aligned``), any
    of them LoRA factors (``factored``)."""
    return (FP8 if quantized else SIXTEEN_BIT if min(itemsizes, default=4) < 4 else 0.0) + (
        VOCABULARY if aligned else 0.0) + (FACTORED if factored else 0.0)
