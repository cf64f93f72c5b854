"""Build the demo chat dataset `mlx_mistral/data/demo/{train,valid,test}.jsonl` from real text on disk.

    python bench/make_demo_data.py            # writes the three files (deterministic for a Python version)

Questions and answers about the Python standard library, read from the docstrings of its source files
with `ast` (nothing is imported or executed): "What does the `textwrap` module do?" -> the first paragraph
of its module docstring; "What does `textwrap.dedent()` do?" -> the first paragraph of the function's
docstring; some conversations add a system prompt or a second turn listing a module's functions.
The committed files were generated with CPython 3.11.7.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sys
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "mlx_mistral" / "data" / "demo"
SIZES = {"train": 300, "valid": 40, "test": 40}
SYSTEM = "You are a concise assistant that explains the Python standard library."
SKIP = {"antigravity", "this", "__future__", "__hello__", "__phello__"}


def first_paragraph(doc: str | None, limit: int = 700) -> str | None:
    """The first paragraph of a docstring as one line, or None when it is too short or too long."""
    if not doc:
        return None
    para = doc.strip().split("\n\n")[0]
    text = re.sub(r"\s+", " ", para).strip()
    if len(text) < 40 or len(text) > limit or text.startswith((">>>", "$", "usage:", "Usage:")):
        return None
    return text


def stdlib_trees(files, skip=SKIP):
    """(name, ast tree) of each (name, source file) of the standard library, sorted by name, leaving out
    private and `skip`ped names and files that do not parse (nothing is imported or executed)."""
    for name, f in sorted(files):
        if name.startswith("_") or name in skip or name not in sys.stdlib_module_names:
            continue
        try:
            yield name, ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue


def stdlib_modules():
    """(name, module docstring, {public function: docstring}) of the top-level pure-Python stdlib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for name, tree in stdlib_trees((f.stem, f) for f in root.glob("*.py")):
        funcs = {n.name: ast.get_docstring(n) for n in tree.body
                 if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
        yield name, ast.get_docstring(tree), funcs


def conversations(rng: random.Random):
    """(module questions, function questions): lists of message lists."""
    modules, functions = [], []
    for name, doc, funcs in stdlib_modules():
        answer = first_paragraph(doc)
        if answer:
            msgs = [{"role": "user", "content": f"What does the Python `{name}` module do?"},
                    {"role": "assistant", "content": answer}]
            public = sorted(funcs)
            if len(public) >= 3 and rng.random() < 0.4:
                shown = ", ".join(f"`{n}()`" for n in public[:6])
                msgs += [{"role": "user", "content": "Which functions does it provide?"},
                         {"role": "assistant", "content": f"Among others, `{name}` provides {shown}."}]
            modules.append(msgs)
        for fn, fdoc in sorted(funcs.items()):
            answer = first_paragraph(fdoc)
            if answer:
                functions.append([{"role": "user", "content": f"What does `{name}.{fn}()` do?"},
                            {"role": "assistant", "content": answer}])
    for msgs in modules + functions:
        if rng.random() < 0.3:
            msgs.insert(0, {"role": "system", "content": SYSTEM})
    return modules, functions


def main():
    rng = random.Random(0)
    module_qs, func_qs = conversations(rng)
    rng.shuffle(func_qs)
    total = sum(SIZES.values())
    chosen = module_qs + func_qs[:max(0, total - len(module_qs))]
    if len(chosen) < total:
        raise SystemExit(f"only {len(chosen)} conversations found, need {total}")
    chosen = chosen[:total]
    rng.shuffle(chosen)
    OUT.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, n in SIZES.items():
        lines = [json.dumps({"messages": c}, ensure_ascii=False) for c in chosen[start:start + n]]
        (OUT / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        start += n
        print(f"{OUT / (split + '.jsonl')}: {n} conversations")


if __name__ == "__main__":
    main()
