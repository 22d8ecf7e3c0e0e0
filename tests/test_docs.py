"""Code blocks in the README and the docs run, so the documentation never lies.

Every ```python block of a page runs, in order, in one namespace per page. A block that uses
top-level ``await`` (a notebook cell) runs inside a running event loop, as Jupyter runs it. A block preceded by the line `<!-- no-run -->` is shown but not run (for
snippets that need a server or a GPU).
"""

import ast
import asyncio
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?P<skip><!-- no-run -->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(page: Path) -> list[str]:
    return [m["code"] for m in BLOCK.finditer(page.read_text()) if not m["skip"]]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = blocks(page)
    if not code:
        pytest.skip("no python blocks")
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    compiled = [
        compile(b, f"{page.name}[block {i}]", "exec", flags=flags) for i, b in enumerate(code)
    ]
    for i, c in enumerate(compiled):
        try:
            result = eval(c, namespace)
            if asyncio.iscoroutine(result):  # a notebook cell: run it inside a running loop
                asyncio.run(result)
        except Exception as exc:
            raise AssertionError(f"{page.name} block {i} failed: {exc!r}\n{code[i]}") from exc


def test_docs_link_to_existing_pages() -> None:
    link = re.compile(r"\]\(((?!https?:)[^)#\s]+\.md)(#[^)]*)?\)")
    broken = [
        f"{page.relative_to(ROOT)} -> {target}"
        for page in PAGES
        for target, _ in link.findall(page.read_text())
        if not (page.parent / target).exists()
    ]
    assert broken == []


def test_docs_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="needs the docs extra")
    from conftest import run_python

    run_python(
        "import sys; from mkdocs.__main__ import cli; "
        f"sys.argv = ['mkdocs', 'build', '--strict', '-q', '-d', {str(tmp_path / 'site')!r}]; cli()",
        env={"NO_MKDOCS_2_WARNING": "1"},
        timeout=180,
    )
    assert (tmp_path / "site" / "index.html").exists()


def test_every_environment_variable_is_documented() -> None:
    from fastinfer import _env

    page = (ROOT / "docs" / "environment-variables.md").read_text()
    assert [v for v in _env.VARIABLES if f"`{v}`" not in page] == []
