"""What the demo shows after its fine-tune (rich): the two rates next to the test loss, before and after, then
held-out questions with the base's and the adapted model's greedy answers side by side.

`before_after(result, width)` takes the dict recipes/demo.py reports as "compare" (and writes to
results.json): {"prompts", "steps", "before", "after"}, each side {"loss", "loss_tokens", "answers",
"rates", "checks"}, and "after" also "unseen" rates. It returns rich renderables; the CLI prints them.
"""

from __future__ import annotations

SHOWN = 8  # held-out questions shown side by side


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _para(text: str):
    """A paragraph indented by two columns, wrapped to the console's width."""
    from rich.padding import Padding
    from rich.text import Text

    return Padding(Text(text), (0, 0, 0, 2))


def before_after(result: dict, width: int = 100) -> list:
    """The rates table, its legend, the side-by-side answers and the honest limits, as rich renderables."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    b, a = result["before"], result["after"]
    rb, ra = b["rates"], a["rates"]
    prompts = result["prompts"]
    out = [_para(f"{len(prompts)} held-out questions (about functions in no training data), greedy answers:")]
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("", "tag format", "right module", "test loss"):
        t.add_column(name, justify="right" if name else "left")
    t.add_row("before (pre-trained base)", _pct(rb["format"]), _pct(rb["module"]), f"{b['loss']:.3f}")
    t.add_row(f"after (+ LoRA, {result['steps']} steps)", _pct(ra["format"]), _pct(ra["module"]), f"{a['loss']:.3f}")
    out.append(t)
    out.append(_para(
        "tag format: the answer starts with [name]; right module (the prompt-dependent rate): that name is "
        f"the module the question asks about. Test loss: mean over the {b['loss_tokens']} answer tokens of the test split. An answer that "
        f"ignores the question (one fixed tag) could be right for at most {_pct(rb['constant_baseline'])}."))

    s = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    w = max(width - 12, 60)  # question / before / after share the width: one line per question
    for name, frac in (("held-out question", 0.38), ("before", 0.28), ("after", 0.34)):
        s.add_column(name, width=int(w * frac), no_wrap=True, overflow="ellipsis")
    s.add_column("", width=1, no_wrap=True)
    every = max(1, len(prompts) // SHOWN)  # a spread of modules, not the first few
    for i in range(0, len(prompts), every)[:SHOWN]:
        fmt, right = a["checks"][i]
        mark = "[green]✓[/]" if right else ("[yellow]~[/]" if fmt else "[red]✗[/]")
        s.add_row(escape(prompts[i]), escape(b["answers"][i]), escape(a["answers"][i]), mark)  # "[json]" is not markup
    out.append(s)
    out.append(_para("✓ the tag names the module asked about   ~ another module   ✗ no tag"))
    u = a.get("unseen")
    if u:
        out.append(_para(
            f"On {u['n']} questions about modules that are in no training data: tag format {_pct(u['format'])}, "
            f"right module {_pct(u['module'])}. The model tags only with modules it was trained on: the behaviour "
            "carries over to new questions about trained modules, not to new modules."))
    out.append(_para(
        "What this shows: LoRA taught a 1.8M-parameter random-initialised model, pre-trained for about two minutes "
        "on 20k tokens, a new answer form that depends on the question. The text after the tag is mostly wrong "
        "or memorised: a model this small knows nothing of the standard library. For useful answers, fine-tune a "
        "real model (the README's quick start)."))
    return out
