"""Preference data (core/pairs.py) and the loss formulas (core/preference.py) without a model: records
formatted by SFT's chat code, file:line errors, the cache, whole pairs packed with SFT's isolation, local
sequence ids, padded pair slots that change nothing, the Wilson interval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_mistral.core import preference as P
from mlx_mistral.core.chat import encode_chat, encode_completion
from mlx_mistral.core.pairs import Pair, encode_pair, load_pairs, pack_pairs, split_pairs
from mlx_mistral.core.tokenizer import Tokenizer, bundled_tokenizer_path

MSG = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
       "chosen": [{"role": "assistant", "content": "Paris."}],
       "rejected": [{"role": "assistant", "content": "Lyon."}]}
TEXT = {"prompt": "Q: 2 + 2 =", "chosen": " 4", "rejected": " 5"}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(bundled_tokenizer_path("mistral_instruct_tokenizer_240323.model.v3"))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_MISTRAL_CACHE", str(tmp_path / "cache"))


def test_records_are_formatted_by_the_sft_chat_code(tok):
    p = encode_pair(tok, MSG)
    for side in ("chosen", "rejected"):
        full, loss = encode_chat(tok, MSG["prompt"] + MSG[side])  # SFT: loss on the assistant turn + EOS
        np.testing.assert_array_equal(getattr(p, side), full)
        np.testing.assert_array_equal(getattr(p, f"{side}_mask"), loss)
    assert p.chosen[-1] == tok.eos_id and p.prompt_len == int(np.argmax(p.rejected_mask))
    t = encode_pair(tok, TEXT)
    full, loss = encode_completion(tok, TEXT["prompt"], TEXT["chosen"])
    np.testing.assert_array_equal(t.chosen, full)
    np.testing.assert_array_equal(t.chosen_mask, loss)
    ids = t.trl_ids()
    assert ids["prompt_ids"] + ids["chosen_ids"] == t.chosen.tolist()


@pytest.mark.parametrize("rec, match", [
    ({"prompt": "a", "chosen": "b"}, "expected"),
    ({"prompt": "a", "chosen": " ", "rejected": "c"}, "'chosen' is empty"),
    ({"prompt": "a", "chosen": "b", "rejected": ["c"]}, "all strings or all lists"),
    ({**MSG, "rejected": [{"role": "user", "content": "x"}]}, "assistant messages"),
    ({**MSG, "prompt": [{"role": "assistant", "content": "x"}]}, "ending with a user message"),
])
def test_bad_records_are_file_line_errors(tmp_path, tok, rec, match):
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps(TEXT) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=match) as e:
        load_pairs(f, tok)
    assert f"{f}:2:" in str(e.value)
    f.write_text(json.dumps(TEXT) + "\n{not json\n")
    with pytest.raises(ValueError, match=rf"{f}:2: malformed JSON"):
        load_pairs(f, tok)


def test_cache_round_trip(tmp_path, tok):
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in (TEXT, MSG, TEXT)) + "\n")
    first, entry = load_pairs(f, tok)
    again, entry2 = load_pairs(f, tok)
    assert entry == entry2 and (entry / "meta.json").exists() and len(again) == 3
    for a, b in zip(first, again):
        for k in ("chosen", "chosen_mask", "rejected", "rejected_mask"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k))


def _rand_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = rng.integers(3, 99, rng.integers(3, 20))
        sides = []
        for _ in range(2):
            c = rng.integers(3, 99, rng.integers(2, 15))
            sides += [np.r_[p, c].astype(np.int32), np.r_[np.zeros(len(p)), np.ones(len(c))].astype(np.int32)]
        out.append(Pair(*sides))
    return out


def test_pairs_are_packed_whole_with_sft_isolation():
    pairs = _rand_pairs(30)
    rows = pack_pairs(pairs, 64)
    assert rows.max_pairs_per_row >= 2 and len(rows) < len(pairs)
    for k, p in enumerate(pairs):
        r = rows.pair_row[k]
        for side, ids, mask in ((0, p.chosen, p.chosen_mask), (1, p.rejected, p.rejected_mask)):
            at = rows.seq_index[r] == 2 * k + side
            np.testing.assert_array_equal(rows.tokens[r][at], ids)  # contiguous, whole, in its pair's row
            np.testing.assert_array_equal(rows.positions[r][at], np.arange(len(ids)))
            assert len(set(rows.segment_ids[r][at])) == 1  # one segment per sequence
            # completion targets: the next token of the same sequence, where the mask says so
            assert rows.weights[r][at].sum() == mask[1:].sum() and rows.full_weights[r][at].sum() == len(ids) - 1
    assert rows.chosen_targets(np.arange(len(rows))) == sum(len(p.chosen) - 1 for p in pairs)
    *_, local, ids = rows.take([0, 2], slots=rows.max_pairs_per_row * 2)
    np.testing.assert_array_equal(np.sort(ids), rows.pairs_in([0, 2]))
    assert set(np.unique(local)) == set(range(-1, 2 * len(ids)))
    # a repeated row (a batch larger than the data) gets slots of its own: its pairs count twice
    *_, local, ids = rows.take([1, 1], slots=rows.max_pairs_per_row * 2)
    n = rows.pair_count([1])
    assert len(ids) == 2 * n == rows.pair_count([1, 1]) and list(ids[:n]) == list(ids[n:])
    assert set(np.unique(local[0])) == set(range(-1, 2 * n)) and set(np.unique(local[1])) == {-1, *range(2 * n, 4 * n)}
    with pytest.raises(ValueError, match="pair 0 has .* more than seq_len 8"):
        pack_pairs(pairs[:1], 8)


def test_held_out_pairs_are_disjoint_and_seeded():
    tr, va = split_pairs(50, 0.2, 3)
    assert len(va) == 10 and not set(tr) & set(va) and len(tr) + len(va) == 50
    np.testing.assert_array_equal(va, split_pairs(50, 0.2, 3)[1])


def test_sigmoid_refuses_label_smoothing_and_accuracy_is_strict():
    z = np.zeros(3)
    with pytest.raises(ValueError, match="robust"):
        P.dpo_loss(z, z, z, z, 0.1, "sigmoid", 0.1)
    _, m = P.dpo_loss(z, z, z, z, 0.1)
    assert m["rewards/accuracies"] == 0.0  # a tie (fresh adapters) is not correct, as in TRL


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_padded_pair_slots_change_nothing(objective):
    rng = np.random.default_rng(0)
    S, real = 6, 4
    st = {"logp": -rng.uniform(5, 50, 2 * S), "n": rng.integers(2, 9, 2 * S).astype(float),
          "full_logp": -rng.uniform(50, 90, 2 * S), "full_n": rng.integers(10, 20, 2 * S).astype(float)}
    for k in st:
        st[k][2 * real:] = 0.0  # empty slots sum nothing
    ref = -rng.uniform(5, 50, 2 * S)
    valid = np.r_[np.ones(real), np.zeros(S - real)]
    loss, per = P.micro_loss(objective, st, ref, valid, real, 40, 0.1)
    trimmed = {k: v[:2 * real] for k, v in st.items()}
    loss2, _ = P.micro_loss(objective, trimmed, ref[:2 * real], np.ones(real), real, 40, 0.1)
    assert np.isfinite(loss) and loss == pytest.approx(loss2, rel=1e-12)
    assert all(np.isfinite(v).all() for v in per.values())


def test_wilson_interval():
    lo, hi = P.accuracy_interval(36, 40)
    assert 0.76 < lo < 0.77 and 0.96 < hi < 0.97  # 36 of 40: (0.7695, 0.9604)


@pytest.mark.parametrize("split", ["train", "valid"])
def test_bundled_demo_pairs_have_no_surface_feature(split):
    """The demo preference set: every pair's two answers start with the same token, and length does not tell
    them apart (the longer side is the chosen one about half the time)."""
    from mlx_mistral.core.data import DEMO

    tok = Tokenizer(bundled_tokenizer_path("tokenizer.model.v1"))
    pairs, _ = load_pairs(DEMO / "preference", tok, split, cache=False)
    assert len(pairs) >= (150 if split == "train" else 40)
    n = [p.prompt_len for p in pairs]
    assert all(p.chosen[k] == p.rejected[k] for p, k in zip(pairs, n))
    longer = np.mean([len(p.chosen) > len(p.rejected) for p in pairs])
    assert 0.35 <= longer <= 0.65, longer
    completions = np.array([(len(p.chosen) - k, len(p.rejected) - k) for p, k in zip(pairs, n)])
    ratio = completions[:, 0].mean() / completions[:, 1].mean()
    assert 0.9 <= ratio <= 1.1, ratio
