"""The task vectors the method contract feeds a method: tiny, seeded float32 stacks of known structure.

Every function takes the number of tasks T, which the checks choose within the method's
``models`` range (:func:`primerge.testing.checks.method_tags`).

- :func:`stock_model`: a 24 × 16 matrix and its 16-entry bias (a shared rank-1 direction, a rank-2
  part per task and noise, so SVD methods meet a generic spectrum);
- :func:`mixed_stack` / :func:`lowrank_stack`: task vectors as a LoRA adapter gives them, factors
  L R (ranks 3 and 2, a zero B as peft initialises it, a rank-0 task), in the mixed stack beside a
  dense task, the singular values of every task set apart (:data:`SPECTRA`);
- :func:`equal_sum_pair`: two different stacks whose sums are the same float32 tensor, exactly:
  every entry and every partial sum is a multiple of 1/16 below 2^6, so no addition rounds, in
  any order;
- :func:`zero_stacks`: the zero task vectors in each form the stream hands over.

Every tensor comes with the context the stream would give it (:func:`context`): its seed, θ₀ and,
for a matrix, the Gram matrices of its inputs on each task's data.
"""

from __future__ import annotations

import torch
from torch import Tensor

from primerge.methods.base import Kind, TensorContext
from primerge.methods.stack import LowRank, TaskStack
from primerge.util.seeding import derive_seed, generator

#: The matrix parameter, its bias, the number of tasks when the method's ``models`` allow it.
MATRIX, BIAS, TASKS = (24, 16), (16,), 3
#: Singular values of the factored tasks (ranks 3 and 2) and of the dense one: gaps of at least
#: 0.1 between and below them, so the top-r subspaces of every task are well defined at any r.
SPECTRA = ((1.0, 0.6, 0.3), (0.9, 0.45), (0.8, 0.5, 0.35, 0.2))
#: The recipe seed the contexts' seeds are derived from (the stream's rule, primerge.util.seeding).
SEED = 42

Model = list[tuple[TaskStack, TensorContext]]


def context(name: str, shape: tuple[int, ...], tasks: int, kind: Kind | None = None,
            seed: int = SEED) -> TensorContext:
    """The context the stream gives tensor ``name`` of ``shape``: ``matrix`` for a 2-D tensor unless
    ``kind`` says otherwise, the seed derived from the recipe seed and the name, a θ₀ of its own and,
    for a matrix, the (T, n, n) float64 Gram matrices X_tᵀX_t / rows of T tasks' inputs. A method sees
    θ₀ and the Grams only if it declares it reads them (:func:`primerge.testing.merging.as_given`)."""
    g = generator(seed, name, "inputs")
    base = torch.randn(shape, generator=g, dtype=torch.float64).float()
    grams = None
    if len(shape) == 2:
        rows = torch.randn(tasks, 4 * shape[1], shape[1], generator=g, dtype=torch.float64)
        grams = rows.mT @ rows / rows.shape[1]
    return TensorContext(name, kind or ("matrix" if len(shape) == 2 else "fallback"), derive_seed(seed, name),
                         base=base, grams=grams)


def structured(tasks: int, shape: tuple[int, ...], seed: int) -> Tensor:
    """``tasks`` float32 task vectors of ``shape``: for a matrix, a shared rank-1 part, a rank-2 part
    per task and 10 % Gaussian noise; otherwise Gaussian entries."""
    g = torch.Generator().manual_seed(seed)
    if len(shape) != 2:
        return torch.randn(tasks, *shape, generator=g, dtype=torch.float64).float()
    m, n = shape
    f64 = torch.float64
    shared = torch.randn(m, 1, generator=g, dtype=f64) @ torch.randn(1, n, generator=g, dtype=f64)
    own = torch.randn(tasks, m, 2, generator=g, dtype=f64) @ torch.randn(tasks, 2, n, generator=g, dtype=f64)
    return (shared + own + 0.1 * torch.randn(tasks, m, n, generator=g, dtype=f64)).float()


def stock_model(tasks: int, seed: int = SEED, matrix: tuple[int, int] = MATRIX) -> Model:
    """A matrix and its bias with their task vectors and contexts."""
    bias = (matrix[1],)
    return [(TaskStack.of(structured(tasks, matrix, seed)), context("layer.weight", matrix, tasks, seed=seed)),
            (TaskStack.of(structured(tasks, bias, seed + 1)), context("layer.bias", bias, tasks, seed=seed))]


def lowrank(shape: tuple[int, int], singular_values: tuple[float, ...], g: torch.Generator) -> LowRank:
    """U diag(s) Vᵀ as factors L = U diag(s) (m × k), R = Vᵀ (k × n), U and V orthonormal."""
    m, n = shape
    U = torch.linalg.qr(torch.randn(m, len(singular_values), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(singular_values), generator=g, dtype=torch.float64)).Q
    s = torch.tensor(singular_values, dtype=torch.float64)
    return LowRank((U * s).float(), V.mT.float().contiguous())


def adapter_rows(shape: tuple[int, int], seed: int) -> list[LowRank | Tensor]:
    """Task vectors as adapters give them: factors of rank 3, a dense task of rank 4 (a full
    fine-tune), a zero B (peft's initial ``lora_B``), factors of rank 2, a rank-0 task (a module
    the adapter leaves alone)."""
    g = torch.Generator().manual_seed(seed)
    rank3, rank2, dense = (lowrank(shape, s, g) for s in SPECTRA)
    zero_b = LowRank(torch.zeros(shape[0], 2), torch.randn(2, shape[1], generator=g))
    return [rank3, dense.dense(), zero_b, rank2, LowRank.zero(shape, torch.device("cpu"))]


def stack_of(rows: list[LowRank | Tensor], shape: tuple[int, int]) -> TaskStack:
    """The stack of task vectors given as factors or as dense matrices, in that order."""
    dense_index = [t for t, row in enumerate(rows) if isinstance(row, Tensor)]
    dense = torch.stack([rows[t] for t in dense_index]) if dense_index else torch.zeros(0, *shape)
    return TaskStack(dense, dense_index, {t: row for t, row in enumerate(rows) if isinstance(row, LowRank)})


def mixed_stack(tasks: int, seed: int = SEED, shape: tuple[int, int] = MATRIX) -> TaskStack:
    """The first ``tasks`` of :func:`adapter_rows` (again from the first past five)."""
    rows = adapter_rows(shape, seed)
    return stack_of([rows[t % len(rows)] for t in range(tasks)], shape)


def lowrank_stack(tasks: int, seed: int = SEED, shape: tuple[int, int] = MATRIX) -> TaskStack:
    """Every task given as factors (the path that never forms an m × n task vector): the factored
    rows of :func:`adapter_rows` but the zero B, in turn."""
    rows = [row for i, row in enumerate(adapter_rows(shape, seed)) if i in (0, 3, 4)]
    return stack_of([rows[t % len(rows)] for t in range(tasks)], shape)


def equal_sum_pair(shape: tuple[int, ...], tasks: int, seed: int = SEED) -> tuple[TaskStack, TaskStack]:
    """Two stacks with the same sum, exactly (see the module docstring): B = A + C where the rows of
    C are c, −c, 0, ... (B = A for a single task)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(-16, 17, (tasks, *shape), generator=g).float() / 16
    moved = torch.zeros(tasks, *shape)
    if tasks > 1:
        c = torch.randint(-16, 17, shape, generator=g).float() / 16
        moved[0], moved[1] = c, -c
    return TaskStack.of(first), TaskStack.of(first + moved)


def zero_stacks(shape: tuple[int, ...], tasks: int) -> list[TaskStack]:
    """Zero task vectors as dense rows and, for a matrix, as factors: rank 0 and a zero B."""
    stacks = [TaskStack.of(torch.zeros(tasks, *shape))]
    if len(shape) == 2:
        g = torch.Generator().manual_seed(0)
        zero_b = LowRank(torch.zeros(shape[0], 2), torch.randn(2, shape[1], generator=g))
        rows = [LowRank.zero(shape, torch.device("cpu"))] * (tasks - 1) + [zero_b]
        stacks.append(stack_of(rows, shape))
    return stacks
