"""`generate`, `chat` and `eval` on a run that learned a few chats: the prompts are formatted the way training
formatted them (read from the run's data_format.json), the answers are the trained ones, and eval's loss is the
trainer's own validation loss (the same rows and masks).

A tiny random Mistral (v3 tokenizer: [INST] control tokens) fine-tuned with LoRA for 30 steps memorises three
conversations, one with a system prompt and one with two turns; greedy decoding then gives the trained answers.
Its lm_head is scaled up tenfold first: LoRA trains neither lm_head nor the final norm, and with the random
init's small lm_head no logit can stand out from 32768 (the loss stalls at ~5.39 with a vanishing gradient).
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from mlx_mistral.cli import main

S, U, A = "system", "user", "assistant"
CONVS = [[(U, "What is the capital of France?"), (A, "Paris is the capital.")],
         [(S, "Answer briefly."), (U, "Name a primary color."), (A, "Blue.")],
         [(U, "Say hi."), (A, "Hi there!"), (U, "Now say bye."), (A, "Goodbye!")]]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    import mlx_mistral
    from conftest import make_hf_model
    from safetensors.numpy import load_file, save_file

    d = tmp_path_factory.mktemp("chat_run")
    base = make_hf_model(d / "base", "swa", vocab_size=32768, tokenizer="mistral_instruct_tokenizer_240323.model.v3")
    weights = load_file(base / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 10
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    data = d / "data"
    data.mkdir()
    lines = "".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in conv]}) + "\n" for conv in CONVS)
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text(lines)
    end = mlx_mistral.finetune({"model": str(base), "data": str(data), "out": str(d / "run"), "steps": 30,
                                "lr": 3e-3, "warmup_steps": 0, "seq_len": 64, "batch_size": 2, "eval_every": 30,
                                "eval_rows": 0, "save_every": 0, "backend": "mlx", "compile": False})
    assert end["reason"] == "done" and end["final_loss"] < 0.05
    return base, d / "run", data


def _run(args, stdin=None):
    res = CliRunner().invoke(main, [str(a) for a in args], input=stdin)
    assert res.exit_code == 0, res.output
    return res


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_generate_answers_training_prompts_in_the_trained_format(chat_run, backend):
    base, run, _ = chat_run
    assert json.loads((run / "data_format.json").read_text()) == {"formats": {"chat": 3}, "prompt_format": "chat"}
    gen = ["generate", "--model", base, "--adapter", run, "--backend", backend]
    res = _run(gen + ["--prompt", "What is the capital of France?"])
    assert res.stdout == "Paris is the capital.\n"
    assert f"prompt format: chat, as trained ({run / 'data_format.json'})" in res.stderr
    assert "stop: end of sequence (EOS)" in res.stderr and "peak memory" in res.stderr
    assert "prompt 10 tokens" in res.stderr and "generation 6 tokens" in res.stderr  # 5 answer tokens + EOS
    res = _run(gen + ["--system", "Answer briefly.", "--prompt", "Name a primary color."])
    assert res.stdout == "Blue.\n"
    res = _run(gen + ["--prompt", "What is the capital of France?", "--max-tokens", "2"])
    assert "stop: max tokens reached" in res.stderr and "generation 2 tokens" in res.stderr


def test_chat_keeps_the_conversation(chat_run):
    base, run, _ = chat_run
    res = _run(["chat", "--model", base, "--adapter", run, "--backend", "mlx"],
               stdin="Say hi.\nNow say bye.\n/reset\nSay hi.\n/exit\n")
    assert res.stdout.splitlines() == ["Hi there!", "Goodbye!", "Hi there!"]  # the 2nd turn saw the 1st
    assert res.stderr.count("stop: end of sequence (EOS)") == 3 and "[conversation cleared]" in res.stderr


def test_format_overrides_and_runs_without_a_record(chat_run, tmp_path):
    base, run, _ = chat_run
    res = _run(["generate", "--model", base, "--adapter", run, "--raw", "--prompt", "Hello", "--max-tokens", "3"])
    assert "prompt format: raw, asked for" in res.stderr and "prompt 2 tokens" in res.stderr  # <s> Hello
    bad = CliRunner().invoke(main, ["generate", "--model", str(base), "--adapter", str(run), "--raw", "--system", "x",
                                    "--prompt", "y"])
    assert bad.exit_code == 2 and "needs the chat format" in bad.output
    old = tmp_path / "old"  # a run from before the format was recorded: raw, and the note says so
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("checkpoints", "data_format.json"))
    res = _run(["generate", "--model", base, "--adapter", old, "--prompt", "Hello", "--max-tokens", "3"])
    assert "no data format recorded by training" in res.stderr
    res = _run(["generate", "--model", base, "--adapter", old, "--chat", "--prompt",
                "What is the capital of France?"])
    assert res.stdout == "Paris is the capital.\n"


def test_eval_reports_each_split_on_the_training_masks(chat_run):
    base, run, data = chat_run
    res = _run(["eval", "--model", base, "--adapter", run, "--data", data, "--backend", "mlx"])
    lines = res.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["train", "valid"]  # no test.jsonl
    val = float(lines[1].split("loss ")[1].split()[0])
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    from mlx_mistral.backends.mlx.trainer import device_name

    assert events[0]["event"] == "start" and events[0]["device"] == device_name()  # readable, for the dashboard
    trained = [e["val_loss"] for e in events if e["event"] == "eval"][-1]  # the trainer's, on all valid rows
    assert abs(val - trained) < 5e-5  # printed to 4 decimals
    from mlx_mistral.core.chat import encode_chat
    from mlx_mistral.core.tokenizer import load_tokenizer

    tok = load_tokenizer(base)
    encoded = [encode_chat(tok, [{"role": r, "content": c} for r, c in conv]) for conv in CONVS]
    answers = sum(int(m.sum()) for _, m in encoded)  # the assistant turns and their EOS, as training masks them
    assert int(lines[1].split("(")[1].split()[0]) == answers < sum(len(t) for t, _ in encoded)
