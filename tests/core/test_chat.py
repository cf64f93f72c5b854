"""Chat formatting: token for token what mistral-common's `encode_chat_completion` produces, with the
loss mask exactly on the assistant turns (and their EOS)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mlx_mistral.core.chat import chat_version, encode_chat, encode_completion
from mlx_mistral.core.tokenizer import Tokenizer, bundled_tokenizer_path

TOKENIZERS = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3",
              "v7": "mistral_instruct_tokenizer_241114.model.v7", "tekken": "tekken_240718.json"}

S, U, A = "system", "user", "assistant"
CONVERSATIONS = [
    [(U, "What is 2+2?"), (A, "4.")],
    [(S, "You are terse."), (U, "Name a prime."), (A, "7")],
    [(U, "Hi!"), (A, "Hello. How can I help?"), (U, "Tell me a joke."), (A, "No.  ")],  # trailing spaces
    [(S, "Be kind."), (U, "first"), (A, "one"), (U, "second\nline"), (A, "two\n\nparagraphs"),
     (U, "third"), (A, "three")],
    [(U, "two user"), (U, "messages in a row"), (A, "merged"), (A, "and two assistant ones")],
    [(S, "sys A"), (S, "sys B"), (U, "q"), (A, "a")],
    [(U, "  leading spaces and ünïcödé ✓ 日本語"), (A, "```python\nprint('hi')\n```")],
    [(S, "policy"), (U, "q1"), (A, "a1"), (U, "q2"), (S, "a system message mid-way"), (U, "q3"), (A, "a2")],
    [(A, "an assistant turn first"), (U, "q"), (A, "a")],
]


def as_messages(conv):
    return [{"role": r, "content": c} for r, c in conv]


@functools.lru_cache(maxsize=None)
def mistral_tokenizer(path, mode=ValidationMode.finetuning):
    return MistralTokenizer.from_file(str(path), mode=mode)


def reference(path, conv):
    """mistral-common's tokens for the conversation (fine-tuning mode: it ends with an assistant)."""
    cls = {S: SystemMessage, U: UserMessage, A: AssistantMessage}
    mt = mistral_tokenizer(path)
    req = ChatCompletionRequest(messages=[cls[r](content=c) for r, c in conv])
    return mt.encode_chat_completion(req).tokens


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tok(request):
    return Tokenizer(bundled_tokenizer_path(TOKENIZERS[request.param]))


def test_versions_are_detected(tok):
    name = tok.path.name
    assert chat_version(tok) == {"tokenizer.model.v1": "v1", "tekken_240718.json": "v3"}.get(name, name[-2:])


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_tokens_equal_mistral_common(tok, i):
    conv = CONVERSATIONS[i]
    tokens, _ = encode_chat(tok, as_messages(conv))
    assert tokens.tolist() == reference(tok.path, conv)


def assistant_spans(tok, conv):
    """Tokens of each assistant turn as mistral-common renders it (its text + EOS)."""
    it = mistral_tokenizer(tok.path).instruct_tokenizer
    return [it.encode_assistant_message(AssistantMessage(content=c), False) for r, c in conv if r == A]


@pytest.mark.parametrize("i", [0, 2, 3, 7])
def test_loss_mask_is_exactly_the_assistant_turns(tok, i):
    conv = CONVERSATIONS[i]
    tokens, loss = encode_chat(tok, as_messages(conv))
    spans = assistant_spans(tok, conv)
    # the masked runs, in order, are the assistant turns, each ending with EOS
    runs, cur = [], []
    for t, m in zip(tokens.tolist(), loss.tolist()):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert runs == spans
    assert all(r[-1] == tok.eos_id for r in runs)
    assert int(loss.sum()) == sum(len(s) for s in spans)

    _, last = encode_chat(tok, as_messages(conv), loss_on="last")
    n_last = len(spans[-1])
    assert last.sum() == n_last and np.all(last[-n_last:] == 1)
    _, everything = encode_chat(tok, as_messages(conv), loss_on="all")
    assert everything.sum() == len(tokens)


def test_conversation_ending_with_user_matches_serving_mode(tok):
    conv = [(S, "sys"), (U, "q1"), (A, "a1"), (U, "q2")]
    mt = mistral_tokenizer(tok.path, ValidationMode.test)
    cls = {S: SystemMessage, U: UserMessage, A: AssistantMessage}
    ref = mt.encode_chat_completion(ChatCompletionRequest(messages=[cls[r](content=c) for r, c in conv])).tokens
    tokens, loss = encode_chat(tok, as_messages(conv))
    assert tokens.tolist() == ref
    assert loss.sum() > 0 and loss[-1] == 0


@pytest.mark.parametrize("bad, match", [
    ([{"role": "bot", "content": "x"}], "unknown role 'bot'"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "empty assistant turn"),
    ([{"role": "user", "content": "q"}], "no assistant message"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"},
      {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "cannot follow an assistant"),
    ([], "non-empty list"),
])
def test_bad_conversations_raise(tok, bad, match):
    with pytest.raises(ValueError, match=match):
        encode_chat(tok, bad)


def test_completion_loss_is_the_completion_and_its_eos(tok):
    tokens, loss = encode_completion(tok, "The capital of France is", " Paris.")
    c = tok.encode(" Paris.", bos=False, eos=True)
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    assert tokens[-len(c):].tolist() == c
    assert loss.tolist() == [0] * (len(tokens) - len(c)) + [1] * len(c)
