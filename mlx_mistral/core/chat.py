"""Mistral instruct chat formats -> token ids and a loss mask, identical to mistral-common's.

mistral-common (`MistralTokenizer.encode_chat_completion`) is the reference; tests compare token for
token. What the versions do with a conversation (after merging consecutive same-role messages with
"\\n\\n"):
- v1 (Mistral 7B v0.1, [INST] is plain text): `<s>[INST] {system}\\n\\n{user} [/INST]{assistant}</s>`,
  every piece one SentencePiece encode; all system messages, joined, go before the FIRST user message.
- v2/v3 (v0.2, v0.3, Mixtral 8x22B, Nemo's Tekken): `[INST]` and `[/INST]` are control tokens; the
  joined system prompt goes before the LAST user message; assistant text is right-stripped of spaces.
- v7: system messages stay where they are, each as `[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]`.
Before v7 a conversation that does not start with a user turn gets an empty one. Every assistant turn
ends with EOS, which is in the loss so a fine-tuned model learns to stop.
"""

from __future__ import annotations

import numpy as np

from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
LOSS_ON = ("assistant", "last", "all")
VERSIONS = ("v1", "v2", "v3", "v7")
_JOIN = "\n\n"  # mistral-common's separator for merged messages and the system prompt


def special_id(tok: Tokenizer, piece: str) -> int | None:
    """Id of a control token such as "[INST]", or None when the vocabulary has none."""
    return tok.special_id(piece)


def chat_version(tok: Tokenizer) -> str:
    """The instruct format of a tokenizer: from Tekken's config, else from its control tokens."""
    if tok.kind == "tekken":
        v = tok.tekken_version
    elif special_id(tok, "[SYSTEM_PROMPT]") is not None:
        v = "v7"
    elif special_id(tok, "[INST]") is not None:
        v = "v3"  # v2 and v3 differ only in how tool calls are written
    else:
        v = "v1"
    if v not in VERSIONS:
        raise ValueError(f"{tok.path.name}: instruct format {v} is not supported (supported: "
                         f"{', '.join(VERSIONS)}); pass version= explicitly if it formats chat as one of them")
    return v


def validate_messages(messages) -> list[dict]:
    """Check roles and contents; return the messages as plain {"role", "content"} dicts."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be an object with 'role' and 'content', got {m!r:.80}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise ValueError(f"message {i} is an empty assistant turn; remove it or give it content")
        if out and out[-1]["role"] == "assistant" and role == "system":
            raise ValueError(f"message {i}: a system message cannot follow an assistant turn (mistral-common "
                             "rejects this order); put it before the next user message's turn instead")
        out.append({"role": role, "content": content})
    return out


def _merge(messages: list[dict], version: str) -> tuple[list[dict], str | None]:
    """mistral-common's normalisation: merge same-role runs (a system message in between separates
    them); before v7 pull all system messages out into one system prompt."""
    merged: list[dict] = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"] and m["role"] != "system":
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + _JOIN + m["content"]}
        else:
            merged.append(dict(m))
    if version == "v7":
        return merged, None
    sys_parts = [m["content"] for m in merged if m["role"] == "system" and m["content"]]
    merged = [m for m in merged if m["role"] != "system"]
    if not merged or merged[0]["role"] != "user":
        merged.insert(0, {"role": "user", "content": ""})
    return merged, _JOIN.join(sys_parts) if sys_parts else None


def encode_chat(tok: Tokenizer, messages, loss_on: str = "assistant", version: str | None = None):
    """Tokens and loss mask (numpy int32) of a conversation in the tokenizer's instruct format.

    `loss_on`: "assistant" (every assistant turn with its EOS), "last" (the last assistant turn only)
    or "all" tokens. The tokens are exactly mistral-common's `encode_chat_completion` of the same
    messages (with the final assistant turn rendered as in fine-tuning mode).
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    messages = validate_messages(messages)
    version = version or chat_version(tok)
    if version not in VERSIONS:
        raise ValueError(f"chat format {version!r} is not supported; expected one of {', '.join(VERSIONS)}")
    if loss_on != "all" and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant message to learn from")
    turns, system = _merge(messages, version)
    users = [i for i, m in enumerate(turns) if m["role"] == "user"]
    first_user, last_user = (users[0], users[-1]) if users else (-1, -1)
    last_asst = max(i for i, m in enumerate(turns) if m["role"] == "assistant") if loss_on == "last" else -1
    if version != "v1":
        inst, end_inst = special_id(tok, "[INST]"), special_id(tok, "[/INST]")
        if inst is None or end_inst is None:
            raise ValueError(f"{tok.path.name} has no [INST]/[/INST] control tokens: it is not a {version} tokenizer")

    pieces: list[tuple[list[int], bool]] = [([tok.bos_id], False)]  # (ids, in the loss)
    for i, m in enumerate(turns):
        text = m["content"]
        if m["role"] == "user":
            if version == "v1":
                if i == first_user and system:
                    text = system + _JOIN + text
                ids = tok.encode(f"[INST] {text} [/INST]", bos=False)
            else:
                if i == last_user and system:
                    text = system + _JOIN + text
                ids = [inst] + tok.encode(text, bos=False) + [end_inst]
            pieces.append((ids, False))
        elif m["role"] == "system":  # v7 only: the others moved it into a user turn
            ids = [special_id(tok, "[SYSTEM_PROMPT]")] + tok.encode(text, bos=False) + [
                special_id(tok, "[/SYSTEM_PROMPT]")]
            pieces.append((ids, False))
        else:
            if version != "v1":
                text = text.rstrip(" ")
            ids = tok.encode(text, bos=False) + [tok.eos_id]
            pieces.append((ids, loss_on == "assistant" or i == last_asst))
    tokens = np.concatenate([np.asarray(ids, np.int32) for ids, _ in pieces])
    if loss_on == "all":
        return tokens, np.ones(len(tokens), np.int32)
    loss = np.concatenate([np.full(len(ids), int(on), np.int32) for ids, on in pieces])
    return tokens, loss


def encode_prompt(tok: Tokenizer, messages, version: str | None = None) -> list[int]:
    """Token ids of a conversation that ends with a user turn, ready for the model to answer."""
    tokens, _ = encode_chat(tok, messages, loss_on="all", version=version)
    return tokens.tolist()


def encode_completion(tok: Tokenizer, prompt: str, completion: str, loss_on: str = "completion"):
    """`<s>{prompt}{completion}</s>` as two encodes; loss on the completion and its EOS (or "all")."""
    if loss_on not in ("completion", "all"):
        raise ValueError(f"loss_on must be 'completion' or 'all', got {loss_on!r}")
    p = tok.encode(prompt, bos=True)
    c = tok.encode(completion, bos=False, eos=True)
    tokens = np.asarray(p + c, np.int32)
    loss = np.concatenate([np.full(len(p), int(loss_on == "all"), np.int32), np.ones(len(c), np.int32)])
    return tokens, loss
