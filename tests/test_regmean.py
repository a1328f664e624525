"""RegMean and RegMean++ (primerge.methods.regmean, primerge.calibration): the closed form against
float64 references on small linear problems, the recipe's calibration block, and merges of tiny
real transformers models (BERT, Llama) checked layer by layer against Gram matrices recomputed here
by running each text on its own through the model the paper says the layer's inputs come from."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import primerge
from primerge.calibration.grams import calibration_texts, own_grams
from primerge.calibration.merged import read_index, pass_key
from primerge.core.calibration_block import task_texts
from primerge.core.recipe import build_recipe
from primerge.methods.base import TensorContext
from primerge.methods.regmean import damped, merge, regmean_update, ridge
from primerge.methods.stack import TaskStack
from primerge.util.deterministic import ThreadIndependent
from primerge.util.errors import InputError, RecipeError

F64 = torch.float64
EPS32 = 2.0 ** -24
WORDS = ["red", "green", "blue", "cat", "dog", "bird", "big", "small", "the", "a"]


# --------------------------------------------------------------------------- the closed form


def problem(T=3, m=5, n=4, rows=(9, 12, 7), seed=0):
    """Task inputs X_t (rows_t × n), base W₀ and task vectors τ_t (m × n), float64."""
    g = torch.Generator().manual_seed(seed)
    X = [torch.randn(r, n, generator=g, dtype=F64) for r in rows[:T]]
    taus = torch.randn(T, m, n, generator=g, dtype=F64)
    return X, torch.randn(m, n, generator=g, dtype=F64), taus


def grams_of(X) -> torch.Tensor:
    return torch.stack([x.T @ x / x.shape[0] for x in X])


def test_the_update_solves_the_normal_equations_of_the_least_squares_objective():
    """α = 1: W = W₀ + U minimises Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖²/rows_t, so Σ_t G_t (W − W_t)ᵀ = 0. The
    solve is backward stable: the residual is at most a few n·eps64·κ(A)·‖A‖‖U‖ (κ ≈ 10 here), far
    below 1e-10; any other W has a larger objective."""
    X, W0, taus = problem()
    grams = grams_of(X)
    U = regmean_update(taus, grams, alpha=1.0)
    W = W0 + U
    residual = sum(G @ (W - (W0 + tau)).T for G, tau in zip(grams, taus))
    assert residual.abs().max() < 1e-10

    def objective(w):
        return sum(float(((x @ w.T - x @ (W0 + tau).T) ** 2).sum()) / x.shape[0] for x, tau in zip(X, taus))

    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        assert objective(W) < objective(W + 1e-3 * torch.randn(W.shape, generator=g, dtype=F64))


def test_identical_grams_give_the_mean_at_any_alpha_even_when_singular():
    """Equal Grams: (T G̃ + λI)⁻¹ (G̃ Σ τ_tᵀ + λ τ̄ᵀ) = τ̄ᵀ whatever λ. A rank-2 Gram of 4 features
    (singular: the ridge is used at α = 1) still gives τ̄ to float64 rounding of a system whose
    ridge caps the condition number at about 10⁸ (so 1e-6 is a safe bound)."""
    X, _, taus = problem()
    full = grams_of(X[:1]).expand(3, -1, -1)
    thin = torch.randn(2, 4, dtype=F64)
    singular = (thin.T @ thin)[None].expand(3, -1, -1)
    for grams, bound in ((full, 1e-12), (singular, 1e-6)):
        for alpha in (0.0, 0.5, 1.0):
            assert torch.allclose(regmean_update(taus, grams, alpha), taus.mean(0), atol=bound, rtol=0)
    assert ridge(damped(singular, 1.0).sum(0)) > 0 and ridge(full.sum(0)) == 0


def test_alpha_zero_is_the_diagonal_weighted_mean():
    """α = 0: U[:, j] = Σ_t g_tj τ_t[:, j] / Σ_t g_tj with g_t = diag(G_t) (a diagonal system)."""
    X, _, taus = problem()
    grams = grams_of(X)
    g = grams.diagonal(dim1=-2, dim2=-1)  # (T, n)
    expected = (taus * g[:, None, :]).sum(0) / g.sum(0)
    assert torch.allclose(regmean_update(taus, grams, 0.0), expected, atol=1e-13, rtol=0)


def test_a_feature_no_task_excites_keeps_the_mean_column():
    """Feature 2 is zero in every task's data: its column is undetermined, the ridge sends it to the
    mean of the task vectors and leaves the others within the ridge's pull (λ ≤ 1e-8·mean diag)."""
    X, _, taus = problem()
    X = [x.clone() for x in X]
    for x in X:
        x[:, 2] = 0
    grams = grams_of(X)
    U = regmean_update(taus, grams, 0.9)
    assert torch.allclose(U[:, 2], taus.mean(0)[:, 2], atol=1e-12, rtol=0)
    kept = [0, 1, 3]
    sub = regmean_update(taus[:, :, kept], grams[:, kept][:, :, kept], 0.9)
    assert torch.allclose(U[:, kept], sub, atol=1e-6, rtol=0)


def test_the_method_function_falls_back_to_the_mean_and_checks_shapes():
    X, _, taus = problem()
    stack = TaskStack.of(taus.float())
    mean = merge(stack, TensorContext("w", "matrix"), primerge.get_method("regmean").parameters({"scale": 0.5}))
    assert torch.allclose(mean, 0.5 * taus.float().mean(0))
    params = primerge.get_method("regmean").parameters({})
    solved = merge(stack, TensorContext("w", "matrix", grams=grams_of(X)), params)
    assert solved.dtype == torch.float32
    assert torch.allclose(solved.double(), regmean_update(taus.float(), grams_of(X), 0.9), atol=1e-6)
    with pytest.raises(InputError, match="tensor 'w': its input Gram matrices are \\[3, 5, 5\\]"):
        merge(stack, TensorContext("w", "matrix", grams=torch.eye(5, dtype=F64).expand(3, 5, 5)), params)


def test_the_solve_is_thread_count_independent_under_the_engines_mode():
    g = torch.Generator().manual_seed(2)
    X = [torch.randn(80, 40, generator=g, dtype=F64) for _ in range(3)]
    taus = torch.randn(3, 48, 40, generator=g, dtype=F64).float()
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with ThreadIndependent():
                out.append(regmean_update(taus, grams_of(X), 0.9))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1])


# --------------------------------------------------------------------------- the recipe block


def test_the_calibration_block_is_validated_with_the_recipe(bert_zoo):
    models = [str(p) for p in bert_zoo["models"]]

    def recipe(method, **extra):
        return build_recipe({"base": str(bert_zoo["base"]), "models": models, "method": method, **extra})

    with pytest.raises(RecipeError, match="method 'regmean' solves .* add calibration"):
        recipe("regmean")
    with pytest.raises(RecipeError, match="calibration.data: no data for model 'task1'"):
        recipe("regmean_pp", calibration={"data": {"task0": "a.csv"}})
    with pytest.raises(RecipeError, match=r"calibration.data: 'task9' is not a model.*Did you mean 'task\d'"):
        recipe("regmean", calibration={"data": {"task9": "a.csv"}})
    with pytest.raises(RecipeError, match="unknown field 'calibration.sample'.*samples"):
        recipe("regmean", calibration={"sample": 3, "data": {}})
    with pytest.raises(RecipeError, match="off_diagonal"):
        recipe("regmean", parameters={"off_diagonal": 1.5}, calibration={"data": {f"task{i}": "a" for i in range(3)}})
    block = {"data": {f"task{i}": "a.csv" for i in range(3)}, "samples": 7}
    ok = recipe("regmean", calibration=block)
    assert ok.calibration_config.samples == 7 and ok.calibration_config.max_length == 64
    # a data-free method leaves the block unused (one recipe tunes both kinds), still validated
    assert recipe("ties", calibration=block).calibration_config == ok.calibration_config
    with pytest.raises(RecipeError, match="calibration.data: no data for model 'task1'"):
        recipe("ties", calibration={"data": {"task0": "a.csv"}})


# --------------------------------------------------------------------------- real models


def word_texts(seed: int, count: int = 12) -> list[str]:
    """Texts of 2 to 6 words (so batches are padded), each task with its own word distribution."""
    g = torch.Generator().manual_seed(seed)
    words = WORDS[: 4 + 3 * seed]
    return [" ".join(words[int(j)] for j in torch.randint(0, len(words), (2 + i % 5,), generator=g))
            for i in range(count)]


def write_task(path: Path, texts: list[str]) -> str:
    path.write_text("text,label\n" + "\n".join(f"{t},{i % 2}" for i, t in enumerate(texts)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def bert_data(bert_zoo, tmp_path_factory):
    """The bert_zoo with a word-level BertTokenizer in its base, and one CSV of texts per model."""
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("regmean_bert")
    base = root / "base"
    shutil.copytree(bert_zoo["base"], base)
    (base / "tokenizer_config.json").unlink()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (root / "vocab.txt").write_text("\n".join(vocab + [f"w{i}" for i in range(64 - len(vocab))]) + "\n")
    BertTokenizer(vocab=str(root / "vocab.txt")).save_pretrained(base)
    data = {p.name: write_task(root / f"{p.name}.csv", word_texts(t)) for t, p in enumerate(bert_zoo["models"])}
    return {"base": base, "models": bert_zoo["models"], "data": data}


@pytest.fixture(scope="module")
def llama_data(tmp_path_factory):
    """A tiny Llama (2 blocks) and two fine-tunes that move every tensor, with one CSV each."""
    root = tmp_path_factory.mktemp("regmean_llama")
    return llama_zoo(root, layers=2, move=r".")


def llama_zoo(root: Path, layers: int, move: str) -> dict:
    """Base and two fine-tunes (Gaussian steps on the tensors whose names match ``move``)."""
    import re

    from llm_fixtures import TINY_LLAMA, byte_level_tokenizer, vocabulary
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocabulary()[0]), tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, **{**TINY_LLAMA, "num_hidden_layers": layers})
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    byte_level_tokenizer().save_pretrained(root / "base")
    state = load_file(str(root / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    models, data = [], {}
    texts = [["the position on the net", "a pos it", "net on the position here"],
             ["there the other note on it", "pose it", "the note on position"]]
    for t in range(2):
        folder = root / f"ft{t}"
        shutil.copytree(root / "base", folder)
        tuned = {k: v + 0.05 * torch.randn(v.shape, generator=g) if re.search(move, k) else v for k, v in state.items()}
        save_file(tuned, str(folder / "model.safetensors"), metadata={"format": "pt"})
        models.append(folder)
        data[folder.name] = write_task(root / f"ft{t}.csv", [f"{x} {i}" for i in range(4) for x in texts[t]])
    return {"base": root / "base", "models": models, "data": data}


def calibration(zoo: dict, **settings) -> dict:
    """Every text of every task in one batch (samples beyond the data's token count)."""
    return {"data": zoo["data"], "samples": 100_000, "batch_size": 64, **settings}


def merge_zoo(zoo: dict, method: str, parameters: dict | None = None, **settings):
    return primerge.merge(zoo["base"], [str(p) for p in zoo["models"]], method, task_specific=r"^classifier\.",
                          parameters=parameters, calibration=calibration(zoo, **settings))


def zoo_plan(zoo: dict, method: str, parameters: dict | None = None, **settings):
    """The plan :func:`merge_zoo` merges (the same recipe)."""
    from primerge.core.plan import build_plan

    return build_plan(build_recipe({"base": str(zoo["base"]), "models": [str(p) for p in zoo["models"]],
                                    "method": method, "task_specific": r"^classifier\.", "parameters": parameters or {},
                                    "calibration": calibration(zoo, **settings)}))


def reference_grams(base: Path, state: dict[str, torch.Tensor], texts: list[str], modules: list[str],
                    max_length: int = 64) -> dict[str, torch.Tensor]:
    """XᵀX / rows of each module's input in the base architecture loaded with ``state`` (checkpoint
    names; a ``model.`` prefix is dropped), each text run alone (no padding), in float64."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(base).float().eval()
    own = {k.removeprefix("model."): v for k, v in state.items()}
    model.load_state_dict({k: own[k] for k in model.state_dict()}, strict=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    sums = {m: 0.0 for m in modules}
    rows = {m: 0 for m in modules}

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums[name] + x.T @ x
            rows[name] += x.shape[0]
        return fn

    handles = [model.get_submodule(m).register_forward_hook(hook(m)) for m in modules]
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    return {m: sums[m] / rows[m] for m in modules}


def texts_of(csv: str) -> list[str]:
    """The texts the calibration pass reads: the task's training split (its test split is never read)."""
    texts = task_texts(csv)
    everything = [line.rsplit(",", 1)[0] for line in Path(csv).read_text().splitlines()[1:]]
    assert set(texts) < set(everything)
    return texts


def assert_gram_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """A Gram from a batched, padded float32 forward against one from unpadded single-text forwards:
    the activations agree to float32 rounding through a few dozen operations (relative ~1e-6), so
    1e-4 of the Gram's largest entry bounds the difference with a wide margin."""
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def assert_solved(merged: torch.Tensor, base: torch.Tensor, taus: torch.Tensor, grams: torch.Tensor,
                  alpha: float) -> None:
    """The merged float32 weight equals θ₀ + U with U from NumPy's float64 solve of the same Grams,
    up to the output's two float32 roundings (U, then θ₀ + U: 2^-24 of each, per entry) and the
    float64 solves' difference (below n·eps64·κ·max|U| with κ < 1e6 checked here: < 1e-8·max|U|)."""
    G = grams.numpy()
    G = alpha * G + (1 - alpha) * np.stack([np.diag(np.diag(g)) for g in G])
    A, B = G.sum(0), sum(g @ t.T for g, t in zip(G, taus.double().numpy()))
    assert np.linalg.cond(A) < 1e6
    U = np.linalg.solve(A, B).T
    expected = base.double().numpy() + U
    error = np.abs(merged.double().numpy() - expected)
    bound = EPS32 * (np.abs(expected) + np.abs(U)) + 1e-8 * np.abs(U).max()
    assert (error <= bound).all(), (error - bound).max()


def states(zoo: dict) -> tuple[dict, list[dict]]:
    return (load_file(str(zoo["base"] / "model.safetensors")),
            [load_file(str(m / "model.safetensors")) for m in zoo["models"]])


def test_regmean_merges_a_bert_zoo_from_each_models_own_activations(bert_data, tmp_path, monkeypatch):
    """Every linear layer of a tiny BERT (the pooler too) is the float64 solve on Grams of its input
    through each fine-tune on its own task's texts; biases and norms are the mean. The covariance
    files are one per model, reused by the next merge and by PAVE on the same data."""
    monkeypatch.setenv("PRIMERGE_CACHE", str(tmp_path / "cache"))
    result = merge_zoo(bert_data, "regmean", max_length=16)
    files = sorted((tmp_path / "cache" / "covariances").glob("*.safetensors"))
    assert len(files) == 3
    base, models = states(bert_data)
    modules = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense", "pooler.dense"]
    refs = [reference_grams(bert_data["base"], m, texts_of(bert_data["data"][p.name]), modules, max_length=16)
            for m, p in zip(models, bert_data["models"])]
    plan = zoo_plan(bert_data, "regmean", max_length=16)
    try:
        grams = own_grams(plan)  # the Grams the merge read (from the cached files), for the solve check
    finally:
        plan.close()
    for module in modules:
        name = f"{module}.weight"
        ours = grams(name)
        for t in range(3):
            assert_gram_close(ours[t], refs[t][module])
        taus = torch.stack([m[name] - base[name] for m in models])
        assert_solved(result.state_dict[name], base[name], taus, ours, 0.9)
    bias = "encoder.layer.0.attention.self.query.bias"
    assert torch.allclose(result.state_dict[bias], torch.stack([m[bias] for m in models]).mean(0), atol=1e-6)
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = merge_zoo(bert_data, "regmean", max_length=16)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert all(torch.equal(again.state_dict[k], v) for k, v in result.state_dict.items())
    primerge.merge(bert_data["base"], [str(p) for p in bert_data["models"]], "task_arithmetic",
                   task_specific=r"^classifier\.", purify={"method": "asvd", **calibration(bert_data, max_length=16)})
    assert sorted((tmp_path / "cache" / "covariances").glob("*.safetensors")) == files


def regmean_pp_grams(zoo: dict, cache: Path, parameters: dict):
    """The Grams of the RegMean++ pass of ``zoo``'s merge with ``parameters`` (its cache folder)."""
    plan = zoo_plan(zoo, "regmean_pp", parameters)
    recipe = plan.recipe
    try:
        texts = {label: calibration_texts(recipe.calibration_config, label) for label in recipe.model_labels()}
        found = read_index(cache / "regmean_pp" / pass_key(plan, texts))
    finally:
        plan.close()
    assert found is not None, "the pass left no cached Grams"
    return found


def stage_state(merged: dict, own: dict, stage: str) -> dict:
    """The merged model with the tensors of ``stage`` (a name fragment) taken from ``own``."""
    return {k: own[k] if stage in k else v for k, v in merged.items()}


@pytest.mark.parametrize("zoo_name,stages", [
    ("llama_data", {"layers.0.": ["layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj", "layers.0.mlp.down_proj"],
                    "layers.1.": ["layers.1.self_attn.k_proj", "layers.1.mlp.up_proj"]}),
    ("bert_data", {"layer.1.": ["encoder.layer.1.attention.self.value", "encoder.layer.1.intermediate.dense"],
                   "pooler.": ["pooler.dense"]}),
])
def test_regmean_pp_takes_each_layers_inputs_through_the_merged_model(zoo_name, stages, request, tmp_path,
                                                                       monkeypatch):
    """For every checked block (and BERT's pooler, after the stack), the Grams are those of each
    task's texts through the *merged* model with that block set to the task's own fine-tune
    (recomputed here with whole-model forwards, one text at a time), and the merged weight is the
    float64 solve on them. A second merge reads the cached pass and gives the same bits."""
    zoo = request.getfixturevalue(zoo_name)
    monkeypatch.setenv("PRIMERGE_CACHE", str(tmp_path / "cache"))
    parameters = {"off_diagonal": 0.7}
    result = merge_zoo(zoo, "regmean_pp", parameters)
    grams = regmean_pp_grams(zoo, tmp_path / "cache", parameters)
    base, models = states(zoo)
    merged = {k: result.state_dict[k] if k in result.state_dict else v for k, v in base.items()}
    prefix = "model." if zoo_name == "llama_data" else ""
    for fragment, modules in stages.items():
        for t, (model, path) in enumerate(zip(models, zoo["models"])):
            refs = reference_grams(zoo["base"], stage_state(merged, model, fragment), texts_of(zoo["data"][path.name]),
                                   modules)
            for module in modules:
                assert_gram_close(grams(f"{prefix}{module}.weight")[t], refs[module])
        for module in modules:
            name = f"{prefix}{module}.weight"
            taus = torch.stack([m[name] - base[name] for m in models])
            assert_solved(result.state_dict[name], base[name], taus, grams(name), 0.7)
    again = merge_zoo(zoo, "regmean_pp", parameters)
    assert all(torch.equal(again.state_dict[k], v) for k, v in result.state_dict.items())


def test_regmean_pp_with_one_block_is_regmean(tmp_path, monkeypatch):
    """One block and fine-tunes that change only that block: the merged model's embeddings are the
    base's, so every layer's inputs are each fine-tune's own and RegMean++ is RegMean. The two passes
    run the same float32 operations on the same batches, so the Grams agree to float32 rounding
    and the weights to far within 1e-5 relative."""
    monkeypatch.setenv("PRIMERGE_CACHE", str(tmp_path / "cache"))
    zoo = llama_zoo(tmp_path / "zoo", layers=1, move=r"layers\.0\.")
    plain, plus = merge_zoo(zoo, "regmean"), merge_zoo(zoo, "regmean_pp")
    _, models = states(zoo)
    for name, value in plain.state_dict.items():
        assert torch.allclose(plus.state_dict[name], value, rtol=1e-5, atol=1e-7), name
    name = "model.layers.0.mlp.down_proj.weight"
    mean = torch.stack([m[name] for m in models]).mean(0)
    assert (plain.state_dict[name] - mean).abs().max() > 1e-3  # the Grams shaped it: not the mean
