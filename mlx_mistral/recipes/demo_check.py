"""The demo's automatic check (pure functions): does a generated answer carry the tag the fine-tune taught?

The fine-tuning data (`mlx_mistral/data/demo_tags/tagged`, made by bench/make_tag_demo_data.py) prefixes
every answer with the module the question asks about, in brackets: "What does `json.dumps()` do?" ->
"[json] Serialize ...". A generated answer is checked twice:
- format: it starts with "[name]" (a Python identifier in brackets);
- right module: that name is the module the question asks about, which depends on the prompt (a
  constant tag is right only for the questions about one module: `rates` reports that ceiling too).
"""

from __future__ import annotations

import re

TAG = re.compile(r"^\s*\[([A-Za-z_][A-Za-z0-9_]*)\]")
# How the data's question templates name the module: `m.name`, "the `m` module", "`name` in `m`".
_MODULE_IN_PROMPT = (re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)\.[A-Za-z_]"),
                     re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)` module\b"),
                     re.compile(r"` in `([A-Za-z_][A-Za-z0-9_]*)`"))


def module_of(prompt: str) -> str | None:
    """The module a question asks about, as the data's templates write it: `m.name` (a dotted name in
    backticks), "the `m` module" / "the Python `m` module", or "`name` in `m`"; None for any other question."""
    for pat in _MODULE_IN_PROMPT:
        m = pat.search(prompt)
        if m:
            return m.group(1)
    return None


def check(prompt: str, answer: str) -> tuple[bool, bool]:
    """(format, right module) of one generated answer to `prompt`."""
    m = TAG.match(answer)
    if not m:
        return False, False
    return True, m.group(1) == module_of(prompt)


def rates(pairs) -> dict:
    """Over (prompt, answer) pairs: {"format", "module"} rates, "n", and "constant_baseline": the best
    right-module rate an answer that ignores the prompt can reach (the share of the most asked-about module)."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("rates of no answers: give at least one (prompt, answer) pair")
    n = len(pairs)
    checked = [check(p, a) for p, a in pairs]
    mods = [module_of(p) for p, _ in pairs]
    return {"format": sum(f for f, _ in checked) / n, "module": sum(r for _, r in checked) / n, "n": n,
            "constant_baseline": max(mods.count(m) for m in set(mods)) / n}
