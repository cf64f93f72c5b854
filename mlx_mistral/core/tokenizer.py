"""Mistral tokenizers: SentencePiece (`tokenizer.model`, v1-v7) and Tekken (`tekken.json`, Nemo).

One small interface for both: `encode(text, bos=True, eos=False)`, `decode(ids)`, `bos_id`, `eos_id`,
`vocab_size`, `id_to_piece`. Tekken goes through mistral-common's reference implementation, so ids are
Mistral's own; SentencePiece through the `sentencepiece` library, as mistral-common does.
"""

from __future__ import annotations

import os
from pathlib import Path

TOKENIZER_FILES = ("tekken.json", "tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v7",
                   "tokenizer.model.v1", "tokenizer.model.v2")


class Tokenizer:
    """A Mistral tokenizer read from one file; `kind` is "spm" or "tekken"."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise ValueError(f"tokenizer file {self.path} does not exist")
        if self.path.suffix == ".json":
            try:
                from mistral_common.tokens.tokenizers.tekken import Tekkenizer
            except ImportError as e:  # pragma: no cover - mistral-common is a dependency
                raise ValueError("Tekken tokenizers need mistral-common: pip install mistral-common") from e
            self.kind = "tekken"
            self._tk = Tekkenizer.from_file(str(self.path))
            self.bos_id, self.eos_id = self._tk.bos_id, self._tk.eos_id
            self.unk_id, self.vocab_size = self._tk.unk_id, self._tk.n_words
        else:
            import sentencepiece as spm

            self.kind = "spm"
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
            self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
            self.unk_id, self.vocab_size = self._sp.unk_id(), self._sp.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if self.kind == "tekken":
            return list(self._tk.encode(text, bos=bos, eos=eos))
        ids = self._sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "tekken":
            return self._tk.decode(ids)
        return self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self._tk.id_to_piece(i) if self.kind == "tekken" else self._sp.id_to_piece(i)

    def special_id(self, piece: str) -> int | None:
        """Id of a control token such as "[INST]", or None when the vocabulary has none."""
        if self.kind == "tekken":
            try:
                return self._tk.get_special_token(piece)
            except Exception:  # mistral-common raises several types for an unknown piece
                return None
        i = self._sp.piece_to_id(piece)
        return i if i != self.unk_id and self._sp.is_control(i) else None

    @property
    def tekken_version(self) -> str | None:
        """The instruct version a Tekken file declares ("v3", "v7", ...); None for SentencePiece."""
        if self.kind != "tekken":
            return None
        return str(getattr(self._tk.version, "value", self._tk.version))

    def __repr__(self):
        return f"Tokenizer({self.kind}, {self.path.name}, vocab={self.vocab_size})"


def find_tokenizer_file(model_dir: str | Path) -> Path:
    """The tokenizer file of a model directory (Tekken first, then SentencePiece), or a clear error."""
    d = Path(model_dir)
    for name in TOKENIZER_FILES:
        if (d / name).exists():
            return d / name
    present = ", ".join(sorted(p.name for p in d.iterdir() if "token" in p.name)) or "none"
    raise ValueError(f"{d} has no Mistral tokenizer file (looked for {', '.join(TOKENIZER_FILES)}; "
                     f"tokenizer files present: {present}). Copy the checkpoint's tokenizer.model or "
                     "tekken.json into the directory.")


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    return Tokenizer(find_tokenizer_file(model_dir))


def bundled_tokenizer_path(name: str = "tokenizer.model.v1") -> Path:
    """A real Mistral tokenizer shipped in the mistral-common wheel (`mistral_common/data/NAME`)."""
    import mistral_common

    p = Path(os.path.dirname(mistral_common.__file__)) / "data" / name
    if not p.exists():
        raise ValueError(f"mistral-common ships no tokenizer {name!r}; have: "
                         + ", ".join(sorted(x.name for x in p.parent.iterdir())))
    return p
