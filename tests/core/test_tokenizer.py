"""Our tokenizer against sentencepiece and mistral-common on the tokenizers the mistral-common wheel ships."""

import pytest
import sentencepiece as spm
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mlx_mistral.core.tokenizer import Tokenizer, bundled_tokenizer_path

TEXTS = ["Hello world", " leading space", "Line one\nLine two\n\n  indented", "naïve café — 東京 🙂",
         "def f(x):\n    return x ** 2  # square", "", "1234567890 3.14159"]


@pytest.mark.parametrize("name", ["tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3",
                                  "tekken_240718.json"])
def test_encode_decode_match_references(name):
    path = bundled_tokenizer_path(name)
    ours = Tokenizer(path)
    mc = MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (mc.bos_id, mc.eos_id, mc.n_words)
    sp = None if name.endswith(".json") else spm.SentencePieceProcessor(model_file=str(path))
    for text in TEXTS:
        for bos, eos in ((True, False), (False, False), (True, True)):
            ids = ours.encode(text, bos=bos, eos=eos)
            assert ids == mc.encode(text, bos=bos, eos=eos)
            if sp is not None:
                assert ids == [sp.bos_id()] * bos + sp.encode(text) + [sp.eos_id()] * eos
        assert ours.decode(ours.encode(text, bos=False)) == mc.decode(mc.encode(text, bos=False, eos=False))


def test_vocab_sizes():
    assert Tokenizer(bundled_tokenizer_path("tokenizer.model.v1")).vocab_size == 32000
    assert Tokenizer(bundled_tokenizer_path("mistral_instruct_tokenizer_240323.model.v3")).vocab_size == 32768
