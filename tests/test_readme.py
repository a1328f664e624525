"""The README and docs/ work as written, on the test zoo, and every reference between the
documents and the code resolves in a plain clone.

Code blocks of ``README.md`` and ``docs/**/*.md`` name ``models/bert-base``, ``models/bert-sst2``,
``models/bert-mnli``, ``recipe.yaml`` and ``merged/``: a workspace folder gets those (the tiny BERT
zoo, the README's own YAML recipe) and each block runs there. A fence's language decides what
happens to it:

- ``yaml`` blocks must parse, and a recipe (a mapping with ``base`` and ``models``) must validate;
- ``python`` blocks are executed (each in a fresh namespace; the method, output-format and
  input-kind registries are restored afterwards, so a block may register its own);
- every ``primerge ...`` line of a ``bash`` block is run through the CLI and must exit 0, except
  the commands in :data:`PARSE_ONLY`, which take longer than CI allows or need hardware CI lacks:
  those are parsed by the real argument parser (every option must exist). Other lines must be
  environment set-up (:data:`SETUP`), which is what CI itself runs;
- any other language (``text``, ``console``, none) is not run: use it for output and sketches.
"""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from primerge.cli import main as cli
from primerge.core.recipe import build_recipe

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "primerge"
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 350
#: Commands only parsed, and why: fine-tuning zoos (minutes to an hour), the 100M-parameter
#: benchmark zoo, a GPU cluster, or lm-eval on a causal LM the test zoo is not.
PARSE_ONLY = {
    ("demo",): "fine-tunes a zoo",
    ("zoo",): "fine-tunes a zoo",
    ("tune",): "tunes on a fine-tuned zoo",
    ("eval",): "evaluates a fine-tuned zoo or a causal LM",
    ("bench",): "builds the 100M-parameter benchmark zoo",
    ("merge", "--gpus-per-worker"): "needs a Ray cluster with GPUs",
}
SETUP = ("pip ", "bash ", ". ", "cd ", "export ", "ray ")


class Block(NamedTuple):
    document: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def fenced_blocks(document: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file: ``` + info string, up to the next ``` line."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(document.read_text().splitlines(), 1):
        if lang is None and line.startswith("```"):
            lang, start, body = (line[3:].split() or [""])[0], number, []
        elif lang is not None and line.strip() == "```":
            blocks.append(Block(document, start, lang, "\n".join(body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"{document.relative_to(ROOT)}:{start}: a code block is never closed"
    return blocks


BLOCKS = [block for document in DOCUMENTS for block in fenced_blocks(document)]


def of(lang: str, document: Path | None = None) -> list[Block]:
    return [b for b in BLOCKS if b.lang == lang and (document is None or b.document == document)]


@pytest.fixture()
def workspace(bert_zoo, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    for name, folder in {"bert-base": bert_zoo["base"], "bert-sst2": bert_zoo["models"][0],
                         "bert-mnli": bert_zoo["models"][1]}.items():
        shutil.copytree(folder, tmp_path / "models" / name)
    recipe = next(b.code for b in of("yaml", README) if b.code.startswith("base:"))
    (tmp_path / "recipe.yaml").write_text(recipe)
    shutil.copy(tmp_path / "recipe.yaml", tmp_path / "my.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture()
def registries():
    """The registries a documented extension adds to, as they were before the block ran (every
    built-in entry registered first: the API imports them all)."""
    import primerge.api  # noqa: F401
    from primerge.core.sources import SOURCE_KINDS
    from primerge.methods.base import _REGISTRY
    from primerge.output.base import FORMATS

    saved = [(registry, registry.copy()) for registry in (_REGISTRY, FORMATS, SOURCE_KINDS)]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before) if isinstance(registry, dict) else registry.extend(before)


def commands(block: Block) -> list[str]:
    """The ``primerge ...`` lines of a bash block, in order, comments stripped."""
    found = []
    for line in block.code.splitlines():
        line = line.split("  #")[0].strip()
        if line.startswith("primerge "):
            found.append(line)
        else:
            assert not line or line.startswith(SETUP), f"{block.where}: bash line neither primerge nor setup: {line}"
    return found


def parse_only(argv: list[str]) -> str | None:
    for key, reason in PARSE_ONLY.items():
        if argv[0] == key[0] and all(option in argv for option in key[1:]):
            return reason
    return None


def test_the_documents_have_the_blocks_this_test_runs():
    assert len(of("python", README)) >= 1 and len(of("yaml", README)) >= 1
    assert sum(len(commands(b)) for b in of("bash", README)) >= 5
    assert len(of("python")) > len(of("python", README)), "docs/ has runnable Python examples"


@pytest.mark.parametrize("block", of("yaml"), ids=lambda b: b.where)
def test_yaml_blocks_parse_and_recipes_validate(block, workspace):
    data = yaml.safe_load(block.code)
    if isinstance(data, dict) and "base" in data and "models" in data:
        build_recipe(data, relative_to=workspace)


@pytest.mark.parametrize("block", of("python"), ids=lambda b: b.where)
def test_python_blocks_run(block, workspace, registries):
    exec(compile(block.code, block.where, "exec"), {"__name__": "docs"})


@pytest.mark.parametrize("block", [b for b in of("bash") if commands(b)], ids=lambda b: b.where)
def test_bash_commands_run(block, workspace, capsys):
    """The block's commands in order, as a user would type them (a ``verify`` after a ``merge``)."""
    for line in commands(block):
        argv = shlex.split(line)[1:]
        if parse_only(argv) is not None:
            args = cli.build_parser().parse_args(argv)
            assert callable(args.func), (block.where, line)
            continue
        code = cli.main(argv + (["--quiet"] if argv[0] == "merge" else []))
        assert code == 0, (block.where, line, capsys.readouterr().err)


# ---------------------------------------------------------------------------------- the README


def test_the_readme_is_a_manual():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move results to docs/benchmarks.md, "
        "depth to the other docs/ pages, and link them")


def test_the_readme_methods_table_is_the_registry():
    from primerge.methods.table import methods_table, table_in

    assert table_in(README.read_text()) == methods_table(), (
        "README.md's methods table differs from the registry: regenerate it with "
        "`python -m primerge.methods.table README.md`")


def test_the_table_generator_rewrites_only_its_region(tmp_path):
    """``python -m primerge.methods.table FILE`` replaces what lies between the markers and nothing
    else; a file without them is refused naming the file, and left as it was."""
    from primerge.methods.table import BEGIN, END, main, methods_table, table_in
    from primerge.util.errors import InputError

    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nbefore\n{BEGIN}\n| stale |\n{END}\nafter\n")
    assert main([str(page)]) == 0
    text = page.read_text()
    assert table_in(text) == methods_table()
    assert text.startswith("# Title\n\nbefore\n" + BEGIN + "\n") and text.endswith(f"\n{END}\nafter\n")
    bare = tmp_path / "bare.md"
    bare.write_text("no table here\n")
    with pytest.raises(InputError, match="bare.md"):
        main([str(bare)])
    assert bare.read_text() == "no table here\n"


def test_the_table_escapes_what_would_break_a_row():
    """A ``|`` in a description or a choice is escaped, so every row has the header's 4 cells."""
    from primerge.methods import list_methods
    from primerge.methods.table import methods_table

    rows = methods_table().splitlines()
    assert len(rows) == 2 + len(list_methods())
    assert all(len(re.split(r"(?<!\\)\|", row)) == 6 for row in rows)


def test_algorithms_has_a_section_per_registered_method():
    from primerge.methods import list_methods

    headings = set(re.findall(r"^## (\S+)$", (ROOT / "docs" / "algorithms.md").read_text(), flags=re.M))
    missing = [spec.name for spec in list_methods() if spec.name not in headings]
    assert not missing, f"docs/algorithms.md has no '## <name>' section for: {', '.join(missing)}"


# ---------------------------------------------------------------------------------- references


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def headings(document: Path) -> list[str]:
    outside_code = re.sub(r"^```.*?^```", "", document.read_text(), flags=re.M | re.S)
    return re.findall(r"^#{1,6} (.+)$", outside_code, flags=re.M)


def test_slugs_are_githubs():
    assert slug("Truncated SVDs: `svd: auto | exact | randomized`") == "truncated-svds-svd-auto--exact--randomized"
    assert slug("LoRA / PEFT adapters") == "lora--peft-adapters"


def links(document: Path) -> list[str]:
    """The relative targets of a document's Markdown links and images, outside code blocks."""
    outside_code = re.sub(r"^```.*?^```", "", document.read_text(), flags=re.M | re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", outside_code) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: str(d.relative_to(ROOT)))
def test_links_between_documents_resolve(document):
    broken = []
    for target in links(document):
        path, _, anchor = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and anchor not in {slug(h) for h in headings(file)}:
            broken.append(f"{target} (no such heading in {file.name})")
    assert not broken, f"{document.relative_to(ROOT)}: " + "; ".join(broken)


def code_files() -> list[Path]:
    return [p for folder in ("src", "tests", "benchmarks", "scripts") for p in sorted((ROOT / folder).rglob("*"))
            if p.suffix in (".py", ".sh", ".md", ".toml") and p.is_file() and "egg-info" not in p.parts]


#: ``docs/algorithms.md`` or ``README``, optionally followed by ``, "Section"``.
DOC_REFERENCE = re.compile(r'\b(docs/[\w./-]+\.md|README)\b(?:\.md)?(?:,\s*"([^"\n]+)")?')
#: Upper-case ``.md`` names must be files of the repository (a retired design document is not);
#: LICENSE.md is a file of a base model that outputs copy.
DOCUMENT_NAME = re.compile(r"\b([A-Z][A-Z_]+\.md)\b")


def test_references_to_documents_in_code_resolve():
    """A reference such as ``(docs/algorithms.md, "prime")`` or ``(README, "Quick start")`` in
    code, tests, benchmarks or scripts names a file of this repository and one of its headings."""
    broken = []
    for path in code_files():
        text = path.read_text(errors="replace")
        where = path.relative_to(ROOT)
        for name in DOCUMENT_NAME.findall(text):
            if name != "LICENSE.md" and not (ROOT / name).is_file():
                broken.append(f"{where}: {name} is not in the repository")
        for document, section in DOC_REFERENCE.findall(text):
            file = README if document == "README" else ROOT / document
            if not file.is_file():
                broken.append(f"{where}: {document} does not exist")
            elif section and not any(section.lower() in h.lower() for h in headings(file)):
                broken.append(f'{where}: {document} has no heading "{section}"')
    assert not broken, "\n".join(broken)


def inline_code(document: Path) -> list[str]:
    outside_code = re.sub(r"^```.*?^```", "", document.read_text(), flags=re.M | re.S)
    return re.findall(r"`([^`\n]+)`", outside_code)


def resolves(dotted: str) -> bool:
    """Whether ``primerge.a.b.c`` is a module, or an attribute of the longest importable prefix."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attribute in parts[k:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: str(d.relative_to(ROOT)))
def test_code_named_in_documents_exists(document):
    """Every ``primerge.x.y`` and every ``path.py`` a document names in inline code is there."""
    missing = []
    for span in inline_code(document):
        missing += [name for name in re.findall(r"\bprimerge(?:\.[A-Za-z_]\w*)+", span) if not resolves(name)]
        if re.fullmatch(r"[\w./-]+\.py", span):
            candidates = (ROOT / span, ROOT / "src" / span, SRC / span)
            if not any(c.is_file() for c in candidates) and not ("/" not in span and any(SRC.rglob(span))):
                missing.append(span)
    assert not missing, f"{document.relative_to(ROOT)} names code that does not exist: {', '.join(missing)}"
