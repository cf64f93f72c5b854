"""The torch model against transformers and against the MLX model, far past the window, and on packed rows.

Both attention paths run here on CPU: SDPA with a boolean mask (what CPU uses) and `flex_attention` with
a block mask (what CUDA uses; uncompiled on CPU it is the reference implementation of the same mask).
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import mlx_mistral
from mlx_mistral.backends.mlx import model as mlx_masks
from mlx_mistral.backends.mlx.loader import load as load_mlx
from mlx_mistral.backends.torch import model as tm
from mlx_mistral.core.packing import pack

KINDS = ["swa", "full", "mixtral", "nemo", "mqa"]
L = 130  # > 3x every tiny window (16, 24, 32)
SEQ_LEN = 160

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tokens(n=L, batch=2, seed=0):
    return np.random.default_rng(seed).integers(3, 32000, (batch, n))


@pytest.fixture(scope="module")
def loaded(tiny_models):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = mlx_mistral.load(tiny_models(kind), backend="torch")[0]
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_and_mlx(tiny_models, loaded, kind):
    path = tiny_models(kind)
    model = loaded(kind)
    assert isinstance(model, tm.Model) and model.args.sliding_window in (None, 16, 24, 32)
    assert model.args.sliding_window is None or L >= 3 * model.args.sliding_window
    x = tokens()
    with torch.no_grad():
        ref = reference(path)(torch.tensor(x)).logits.numpy()
        ours = {}
        for impl in ("sdpa", "flex"):
            model.attn_impl = impl
            ours[impl] = model(torch.tensor(x)).numpy()
        model.attn_impl = "auto"
    mlx_model, _ = load_mlx(path)
    mlx_logits = np.array(mlx_model(mx.array(x)))
    assert ref.std() > 0.05
    for impl, got in ours.items():
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-4, impl
        assert np.abs(got - mlx_logits).max() < 1e-4, impl


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_names_and_shapes_equal_mlx(tiny_models, loaded, kind):
    mlx_model, _ = load_mlx(tiny_models(kind))
    ours = {k: tuple(v.shape) for k, v in loaded(kind).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in tree_flatten(mlx_model.parameters())}
    assert ours == theirs
    assert sum(v.numel() for v in loaded(kind).parameters()) == loaded(kind).args.param_count()


def test_masks_and_positions_equal_mlx_masks():
    rng = np.random.default_rng(0)
    seg = np.sort(rng.integers(0, 5, (3, 50)), axis=1)[:, ::-1].copy()  # padding (0) at the end
    seg[0, :7] = 9
    for w in (None, 1, 4, 16):
        got = tm.packed_mask(torch.tensor(seg), w).numpy()
        want = np.array(mlx_masks.packed_mask(mx.array(seg), w))
        assert (got == want).all()
        assert got.any(axis=-1).all()  # no fully masked row, padding included
    q, k = np.arange(5, 12), np.arange(0, 12)
    assert (tm.causal_mask(torch.tensor(q), torch.tensor(k), 4).numpy()
            == np.array(mlx_masks.causal_mask(mx.array(q), mx.array(k), 4))).all()
    assert (tm.positions_from_segments(torch.tensor(seg)).numpy()
            == np.array(mlx_masks.positions_from_segments(mx.array(seg)))).all()
    row = tm.causal_mask(torch.arange(40), torch.arange(40), 8).sum(-1)
    assert row.tolist() == [min(i + 1, 8) for i in range(40)]


def docs_for(seed: int, window: int):
    rng = np.random.default_rng(seed)
    lengths = [3 * window + 7, 2 * window - 3, window + 1, 17, 9, 40, SEQ_LEN + 50, 5]
    return [rng.integers(3, 32000, size=n).astype(np.int32) for n in lengths]


def segments(p, r):
    seg = p.segment_ids[r]
    return [(int(s), np.flatnonzero(seg == s)) for s in np.unique(seg[seg > 0])]


@pytest.mark.parametrize("kind", ["swa", "mixtral", "nemo", "mqa"])
@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_packed_rows_isolate_documents(tiny_models, loaded, kind, impl):
    model = loaded(kind)
    model.attn_impl = impl
    w = model.args.sliding_window
    p = pack(docs_for(0, w), SEQ_LEN)
    mlx_model, _ = load_mlx(tiny_models(kind))
    mid_row_long = 0
    try:
        with torch.no_grad():
            packed = model(torch.tensor(p.tokens), segment_ids=torch.tensor(p.segment_ids),
                           positions=torch.tensor(p.positions))  # (rows, L, vocab)
            implied = model(torch.tensor(p.tokens), segment_ids=torch.tensor(p.segment_ids))
            assert (packed - implied).abs().max() <= 1e-5
            mlx_packed = np.array(mlx_model(mx.array(p.tokens), segment_ids=mx.array(p.segment_ids),
                                            positions=mx.array(p.positions)))
            assert np.abs(packed.numpy() - mlx_packed).max() < 1e-4
            for r in range(p.rows):
                for s, idx in segments(p, r):
                    alone = model(torch.tensor(p.tokens[r, idx])[None])[0]  # (n, vocab)
                    got = packed[r, int(idx[0]):int(idx[-1]) + 1]
                    assert (got - alone).abs().max() <= 1e-5, (r, s)
                    mid_row_long += int(idx[0] > 0 and len(idx) > w)
    finally:
        model.attn_impl = "auto"
    assert mid_row_long >= 1


@pytest.mark.parametrize("kind", ["swa", "mixtral"])
@pytest.mark.parametrize("impl", ["sdpa"])  # flex_attention has no backward on CPU (bench/cuda_check.sh)
def test_no_gradient_flows_between_documents(loaded, kind, impl):
    model = loaded(kind)
    model.attn_impl = impl
    p = pack(docs_for(1, model.args.sliding_window), SEQ_LEN)
    r = int(np.argmax(p.segment_ids.max(axis=1)))
    docs = segments(p, r)
    assert len(docs) >= 3
    row = torch.tensor(p.tokens[r]).long()
    try:
        for s, idx in docs:
            emb = model.model.embed_tokens(row[None]).detach().requires_grad_(True)  # (1, L, hidden)
            logits = model(inputs_embeds=emb, segment_ids=torch.tensor(p.segment_ids[r])[None],
                           positions=torch.tensor(p.positions[r])[None])
            a, b = int(idx[0]), int(idx[-1]) + 1
            loss = torch.nn.functional.cross_entropy(logits[0, a:b - 1], row[a + 1:b])
            (g,) = torch.autograd.grad(loss, emb)
            other = np.ones(SEQ_LEN, bool)
            other[idx] = False
            assert g[0, torch.tensor(other)].abs().max().item() == 0.0, s  # exactly zero, not small
            assert g[0, a:b].abs().max().item() > 0
    finally:
        model.attn_impl = "auto"


@pytest.mark.parametrize("kind", ["swa", "full", "mixtral"])
def test_cached_decoding_equals_full_forward(loaded, kind):
    model = loaded(kind)
    x = torch.tensor(tokens())
    w = model.args.sliding_window
    with torch.no_grad():
        full = model(x)
        cache = tm.make_cache(model)
        outs, pos = [], 0
        for chunk in (20, 1, 1, 7, 1, 40):
            outs.append(model(x[:, pos:pos + chunk], cache=cache))
            pos += chunk
        while pos < L:
            outs.append(model(x[:, pos:pos + 1], cache=cache))
            pos += 1
            if w:
                assert all(c.size == w for c in cache)
    assert (torch.cat(outs, dim=1) - full).abs().max() < 1e-4
    assert cache[0].offset == L


def test_activation_checkpointing_gives_the_same_gradients(loaded):
    model = loaded("swa")
    x = torch.tensor(tokens(batch=1))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.checkpoint_layers = ckpt
        with torch.enable_grad():
            model(x).logsumexp(-1).mean().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    model.checkpoint_layers = False
    model.zero_grad()
    model.requires_grad_(True)
    assert (grads[0] - grads[1]).abs().max() < 1e-6 and grads[0].abs().max() > 0


def test_strict_loading_names_the_problem(tiny_models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_models("swa")
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    w = load_file(str(dst / "model.safetensors"))
    del w["model.layers.1.mlp.up_proj.weight"]
    w["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(w, str(dst / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1: model.layers.1.mlp.up_proj.weight; unexpected 1"):
        mlx_mistral.load(dst, backend="torch")
    with pytest.raises(ValueError, match="unknown backend"):
        mlx_mistral.load(src, backend="jax")


def test_bf16_load_keeps_dtype_and_stays_close(tiny_models, loaded):
    model, tok = mlx_mistral.load(tiny_models("nemo"), dtype="bfloat16", backend="torch")
    assert tok.vocab_size <= model.args.vocab_size
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    x = torch.tensor(tokens(batch=1))
    with torch.no_grad():
        diff = (model(x).float() - loaded("nemo")(x)).abs().max().item()
    assert diff < 0.5  # bf16 rounding, not a different model
