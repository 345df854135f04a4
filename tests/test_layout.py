"""The layout a reader copies from (issue 16): every top-level module readable in one sitting.

    python tests/test_layout.py        # the table: lines, share over 100 characters, longest function
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p.name for p in ROOT.glob("*.py"))
MAX_LINES = 450  # the anchors are 290-340 (nanoGPT, llama3, gpt-fast, loralib)
MAX_FUNCTION = 50  # lines, docstring included
LONG = 100  # characters
MAX_LONG_SHARE = 0.05
LONGER = {"train.py:run"}  # the one training loop, in plain sight as nanoGPT's


def functions(tree):
    """(qualified name, lines) of every function and method."""
    out = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((prefix + child.name, child.end_lineno - child.lineno + 1))
                walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")

    walk(tree, "")
    return out


def measure(name: str) -> dict:
    text = (ROOT / name).read_text(encoding="utf-8")
    lines = text.splitlines()
    fns = functions(ast.parse(text))
    return {"lines": len(lines), "long": sum(len(ln) > LONG for ln in lines) / max(len(lines), 1),
            "longest": max(fns, key=lambda f: f[1], default=("-", 0)),
            "over": [(f, n) for f, n in fns if n > MAX_FUNCTION and f"{name}:{f}" not in LONGER]}


@pytest.mark.parametrize("name", MODULES)
def test_module_reads_in_one_sitting(name):
    m = measure(name)
    assert m["lines"] <= MAX_LINES, f"{name}: {m['lines']} lines > {MAX_LINES}"
    assert m["long"] <= MAX_LONG_SHARE, f"{name}: {m['long']:.1%} of lines over {LONG} characters"
    assert not m["over"], f"{name}: functions over {MAX_FUNCTION} lines: {m['over']}"


def test_no_pointer_outside_the_repository():
    for p in [*ROOT.glob("*.py"), *ROOT.glob("*.md"), *(ROOT / "tests").glob("*.py")]:
        if p.name != "test_layout.py":
            assert "../shared" not in p.read_text(encoding="utf-8"), f"{p.name} points outside the repository"


if __name__ == "__main__":
    for name in MODULES:
        m = measure(name)
        print(f"{name:14s} {m['lines']:5d} lines  {m['long']:6.1%} over {LONG}  longest {m['longest'][0]} "
              f"({m['longest'][1]})  over {MAX_FUNCTION}: {len(m['over'])}")
