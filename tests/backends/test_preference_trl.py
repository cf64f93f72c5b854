"""DPO and ORPO on packed rows, MLX and torch, against TRL 1.16's own computation on its padded batch.

The judge is TRL: `DPOTrainer._compute_loss` / `compute_ref_log_probs` and
`experimental.orpo.ORPOTrainer.get_batch_loss_metrics`, run on TRL's padded batch (its own collators) of the
same token ids, with a PEFT LoRA holding our adapter weights, on a tiny random transformers
MistralForCausalLM (hidden 64, 2 layers, 4 heads / 2 KV heads, sliding window 16; every sequence is >= 3
windows long). Ours is the trainers' own code: pairs packed several to a row (core.pairs), one forward per
pass, per-sequence sums (backends/*/preference.py), the micro-step loss of core.preference with padded pair
slots, and the logged metrics from the per-pair values in float64 (`step_metrics`). The reference is the
same model with its adapters switched off.

Tolerances: 1e-5 absolute on losses, rewards, margins, accuracies and ORPO averages; rtol 1e-6 on summed
log-probs (|logp| ~ 100-300, where fp32's spacing is ~1.5e-5); gradients within 1e-5 of the largest entry.
TRL is imported inside fixtures (it pulls in datasets and pyarrow), and runs offline on in-memory data.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import mlx_mistral.backends.mlx  # noqa: E402,F401  (first: OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from mlx_mistral.backends.mlx import preference as mlx_pref  # noqa: E402
from mlx_mistral.backends.torch import preference as torch_pref  # noqa: E402
from mlx_mistral.core import preference as P  # noqa: E402
from mlx_mistral.core.loop import gather_pairs  # noqa: E402
from mlx_mistral.core.pairs import encode_pair, pack_pairs  # noqa: E402
from mlx_mistral.core.train_config import TrainConfig  # noqa: E402

WINDOW = 16
RANK, ALPHA = 4, 8.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ_LEN = 384  # 2-3 pairs (4-6 sequences) per row
ATOL = 1e-5
RTOL_SUM = 1e-6

SYSTEM = "You are a terse assistant. Answer with the module name and one sentence, nothing else."
RECORDS = [
    {"prompt": "Question: which Python standard library module parses command line arguments, with "
               "subcommands, generated help text, defaults and type conversion of the values? Answer:",
     "chosen": " The argparse module: it builds a parser from declared arguments and prints usage on error.",
     "rejected": " The getpass module: it reads a password from the terminal without echoing it back."},
    {"prompt": "Question: which module of the standard library reads and writes comma separated value "
               "files, handling quoting and dialects? Answer:",
     "chosen": " The csv module, with reader and writer objects and DictReader for rows as mappings.",
     "rejected": " The wave module, which reads and writes uncompressed audio files in the WAV format."},
    {"prompt": [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "Which module gives me a fixed-size, thread-safe FIFO that producer "
                                            "and consumer threads can share without extra locks?"}],
     "chosen": [{"role": "assistant", "content": "queue: Queue(maxsize) blocks producers when full and consumers "
                                                 "when empty."}],
     "rejected": [{"role": "assistant", "content": "heapq: it keeps a list ordered as a binary heap for "
                                                   "priority lookups."}]},
    {"prompt": [{"role": "user", "content": "I need to match dates like 2024-05-01 inside log lines."},
                {"role": "assistant", "content": "Do you want to extract them or only test for them?"},
                {"role": "user", "content": "Extract them, all of them, from each line of a large file."}],
     "chosen": [{"role": "assistant", "content": "re: re.findall(r'\\d{4}-\\d{2}-\\d{2}', line) returns every "
                                                 "date in the line."}],
     "rejected": [{"role": "assistant", "content": "glob: glob.glob('*.log') lists the log files whose names "
                                                   "match the pattern."}]},
    {"prompt": "Question: which module serializes Python dictionaries and lists to a text format that "
               "web services and JavaScript read directly? Answer:",
     "chosen": " The json module: json.dumps turns dicts and lists into a JSON string, json.loads parses it.",
     "rejected": " The shelve module, a persistent dictionary kept in a dbm file on disk between runs."},
    {"prompt": [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "What should I import to measure how long a small snippet takes, "
                                            "repeating it many times to average out noise?"}],
     "chosen": [{"role": "assistant", "content": "timeit: timeit.timeit(stmt, number=10000) runs it repeatedly."}],
     "rejected": [{"role": "assistant", "content": "time: time.sleep(seconds) suspends the calling thread for "
                                                   "that long."}]},
]


# ---- fixtures: one tiny checkpoint, adapters, pairs, rows ----------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tiny_models):
    return tiny_models("swa", sliding_window=WINDOW)


@pytest.fixture(scope="module")
def pairs(ckpt):
    from mlx_mistral.core.tokenizer import load_tokenizer

    ps = [encode_pair(load_tokenizer(ckpt), r) for r in RECORDS]
    assert min(min(len(p.chosen), len(p.rejected)) for p in ps) >= 3 * WINDOW  # every sequence: >= 3 windows
    return ps


@pytest.fixture(scope="module")
def rows(pairs):
    r = pack_pairs(pairs, SEQ_LEN)
    assert len(r) < len(pairs) and r.max_pairs_per_row >= 2  # several pairs share a row
    return r


@pytest.fixture(scope="module")
def adapters(ckpt):
    """name -> (lora_a (in, r), lora_b (r, out)) fp32, random and non-zero so the policy differs from the base."""
    from mlx_mistral.core.adapters import plan_modules
    from mlx_mistral.core.config import ModelArgs

    specs = plan_modules(ModelArgs.from_dir(ckpt), TARGETS, -1, RANK, ALPHA)
    rng = np.random.default_rng(1)
    return {name: (rng.uniform(-1, 1, (s.n_in, s.rank)).astype(np.float32) / np.sqrt(s.n_in),
                   rng.normal(0, 0.25, (s.rank, s.n_out)).astype(np.float32)) for name, s in specs.items()}


@pytest.fixture(scope="module")
def hf_tok(ckpt):
    """TRL wants a transformers tokenizer for its pad/EOS ids; the batches are made of our ids."""
    from transformers import LlamaTokenizer

    t = LlamaTokenizer.from_pretrained(ckpt, legacy=True)
    t.pad_token = t.eos_token
    return t


def torch_ours(ckpt, adapters):
    from mlx_mistral.backends.torch.loader import load_model
    from mlx_mistral.backends.torch.lora import apply_lora, lora_modules

    model = load_model(ckpt, dtype="float32", device="cpu")
    apply_lora(model, TARGETS, num_layers=-1, rank=RANK, alpha=ALPHA)
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            a, b = adapters[name]
            m.lora_a.copy_(torch.from_numpy(a))
            m.lora_b.copy_(torch.from_numpy(b))
    return model.train()


def mlx_ours(ckpt, adapters):
    from mlx_mistral.backends.mlx.loader import load
    from mlx_mistral.backends.mlx.lora import apply_lora

    model, _ = load(ckpt, dtype="float32")
    apply_lora(model, TARGETS, num_layers=-1, rank=RANK, alpha=ALPHA)
    weights = [(f"{n}.lora_a", mx.array(a)) for n, (a, _) in adapters.items()]
    weights += [(f"{n}.lora_b", mx.array(b)) for n, (_, b) in adapters.items()]
    model.load_weights(weights, strict=False)
    mx.eval(model.parameters())
    return model


# ---- TRL's side (memoised per configuration) ------------------------------------------------------------------
_TRL: dict = {}


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")


def _base_model(ckpt):
    from transformers import MistralForCausalLM

    return MistralForCausalLM.from_pretrained(ckpt, dtype=torch.float32)


def _set_peft(pm, adapters):
    """Our adapters into PEFT's "default" LoRA (lora_A = a.T, lora_B = b.T; the scale alpha/r on both)."""
    with torch.no_grad():
        for name, (a, b) in adapters.items():
            mod = pm.base_model.model.get_submodule(name)
            mod.lora_A["default"].weight.copy_(torch.from_numpy(a.T))
            mod.lora_B["default"].weight.copy_(torch.from_numpy(b.T))


def _peft_grads(pm) -> dict[str, np.ndarray]:
    out = {}
    for n, p in pm.named_parameters():
        if "lora_" in n and p.grad is not None:
            ours = n.replace("base_model.model.", "").replace(".lora_A.default.weight", ".lora_a")
            out[ours.replace(".lora_B.default.weight", ".lora_b")] = p.grad.detach().numpy().T
    return out


def _args(tmp):
    return dict(output_dir=str(tmp), report_to=[], use_cpu=True, bf16=False, fp16=False,
                gradient_checkpointing=False, learning_rate=0.0, save_strategy="no", seed=0)


def _dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})  # for __init__ only


def _dpo_trainer(ckpt, hf_tok, adapters, n_pairs, tmp):
    """One DPOTrainer for every DPO configuration (its loss reads `beta`, `loss_types`, `label_smoothing` from
    the trainer, set from DPOConfig in __init__, so a configuration is those three attributes). TRL is given
    the base model plus a peft_config, so its reference is the base with adapters disabled (given a ready
    PeftModel it would copy the starting adapter into a frozen "ref" adapter instead)."""
    if "dpo_trainer" not in _TRL:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(beta=0.1, loss_type=["sigmoid"], max_length=None, per_device_train_batch_size=n_pairs,
                         **_args(tmp))
        tr = DPOTrainer(model=_base_model(ckpt), args=args, train_dataset=_dataset(), processing_class=hf_tok,
                        peft_config=_lora_config())
        assert "ref" not in tr.model.peft_config
        _set_peft(tr.model, adapters)
        _TRL["dpo_trainer"] = tr
    return _TRL["dpo_trainer"]


def trl_dpo(ckpt, adapters, hf_tok, pairs, tmp, beta, loss_type, ls=0.0, one_pair_batches=False):
    """TRL's loss (with gradients), metrics and reference log-probs on its padded batch (memoised)."""
    key = ("dpo", beta, loss_type, ls, one_pair_batches)
    if key in _TRL:
        return _TRL[key]
    tr = _dpo_trainer(ckpt, hf_tok, adapters, len(pairs), tmp)
    tr.beta, tr.loss_types, tr.loss_weights, tr.label_smoothing = beta, [loss_type], [1.0], ls
    tr.model.train()
    tr.model.zero_grad()
    groups = [[p] for p in pairs] if one_pair_batches else [pairs]
    loss_total, metrics, refs = 0.0, [], []
    for g in groups:
        batch = tr.data_collator([p.trl_ids() for p in g])
        loss = tr._compute_loss(tr.model, batch, False)
        (loss / len(groups)).backward()
        loss_total += float(loss.detach()) / len(groups)
        metrics.append({k: v[-1] for k, v in tr._metrics["train"].items()})
        refs.append(tr.compute_ref_log_probs(tr.model, batch))
    ref = np.stack([torch.cat([r[0] for r in refs]).numpy(), torch.cat([r[1] for r in refs]).numpy()], 1)
    _TRL[key] = (loss_total, metrics, ref, _peft_grads(tr.model), batch)
    return _TRL[key]


def trl_orpo(ckpt, adapters, hf_tok, pairs, tmp, beta):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(beta=beta, max_length=4096, per_device_train_batch_size=len(pairs),
                      remove_unused_columns=False, **_args(tmp))
    tr = ORPOTrainer(model=_base_model(ckpt), peft_config=_lora_config(), args=args, train_dataset=_dataset(),
                     processing_class=hf_tok)
    _set_peft(tr.model, adapters)
    tr.model.train()
    feats = []
    for p in pairs:
        n = p.prompt_len
        f = {"prompt_input_ids": p.chosen[:n].tolist(), "prompt_attention_mask": [1] * n}
        for side, ids in (("chosen", p.chosen), ("rejected", p.rejected)):
            f[f"{side}_input_ids"] = ids.tolist()
            f[f"{side}_attention_mask"] = [1] * len(ids)
            f[f"{side}_labels"] = [-100] * n + ids[n:].tolist()
        feats.append(f)
    loss, metrics = tr.get_batch_loss_metrics(tr.model, tr.data_collator(feats))
    loss.backward()
    return float(loss.detach()), metrics, _peft_grads(tr.model)


# ---- our side: the trainers' code on all rows as one micro-step (pair slots padded by one) ------------------
def _step_inputs(rows):
    *arrays, pair_ids = rows.take(np.arange(len(rows)), slots=rows.n_pairs + 1)
    valid = np.zeros(rows.n_pairs + 1, np.float32)
    valid[:len(pair_ids)] = 1
    return tuple(arrays), pair_ids, valid


def _cfg(objective, beta, loss_type="sigmoid", ls=0.0):
    return TrainConfig(fine_tune=objective, beta=beta, dpo_loss=loss_type, label_smoothing=ls)


def ours_torch(model, rows, cfg, token_stats=False):
    arrays, ids, valid = _step_inputs(rows)
    slots, n_pairs = len(valid), len(ids)
    nll_tokens = rows.chosen_targets(np.arange(len(rows)))
    model.zero_grad()
    loss, values = torch_pref.micro_loss(model, cfg, slots, arrays, valid, None, n_pairs, nll_tokens, "cpu")
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.requires_grad}
    step_loss, m = P.step_metrics(cfg.objective, gather_pairs(cfg.objective, [{k: v.detach().numpy() for k, v in
                                                                                values.items()}], [ids]))
    ref = None
    if cfg.objective == "dpo":
        t = torch_pref._tensors(arrays, "cpu")
        ref = torch_pref.reference_logps(model, *t[:5], t[6], 2 * slots).numpy()[:2 * n_pairs].reshape(-1, 2)
        ref = ref[np.argsort(ids)]  # local (row) order -> pair order
        if token_stats:
            with torch.no_grad():
                st = torch_pref.sequence_stats(model, *t[:5], t[6], 2 * slots, token_stats=True)
            m.update(P.to_floats(P.dpo_token_metrics({k: v[0::2] for k, v in st.items()},
                                                     {k: v[1::2] for k, v in st.items()})))
    return float(loss.detach()), step_loss, m, ref, grads


def ours_mlx(model, rows, cfg, compiled=False):
    """The MLX trainer's compiled pieces: the reference pass (adapters off) on its own, then value_and_grad
    of `preference.micro_fn`."""
    arrays, ids, valid = _step_inputs(rows)
    slots = len(valid)
    t = tuple(mx.array(a) for a in arrays)
    tokens, seg, pos, targets, weights, full, local = t
    state = [model.state]

    def ref_fn(*b):
        return mlx_pref.reference_logps(model, *b, 2 * slots)

    vg = nn.value_and_grad(model, mlx_pref.micro_fn(cfg, slots))

    def step(*b):
        return vg(model, *b)

    if compiled:
        ref_fn, step = mx.compile(ref_fn, inputs=state, outputs=state), mx.compile(step, inputs=state, outputs=state)
    ref = ref_fn(tokens, seg, pos, targets, weights, local) if cfg.objective == "dpo" else mx.zeros(2 * slots)
    mx.eval(ref)
    n_tok = rows.chosen_targets(np.arange(len(rows)))
    (loss, values), grads = step(*t, ref, mx.array(valid), mx.array(float(len(ids))), mx.array(float(n_tok)))
    mx.eval(loss, values, grads)
    step_loss, m = P.step_metrics(cfg.objective, gather_pairs(cfg.objective, [{k: np.array(v) for k, v in
                                                                                values.items()}], [ids]))
    return (float(loss), step_loss, m, np.array(ref)[:2 * len(ids)].reshape(-1, 2)[np.argsort(ids)],
            {k: np.array(v) for k, v in tree_flatten(grads)})


# ---- comparisons -----------------------------------------------------------------------------------------------
def check(name, ours, theirs, atol=ATOL, rtol=0.0):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    diff = float(np.abs(ours - theirs).max())
    bound = atol + rtol * float(np.abs(theirs).max())
    assert diff <= bound, f"{name}: max |ours - TRL| = {diff:.3g} > {bound:.3g}"


def check_grads(name, ours: dict, theirs: dict):
    """Gradients of every LoRA matrix: max abs difference within 1e-5 of the largest gradient entry."""
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:4]
    scale = max(np.abs(g).max() for g in theirs.values())
    diff = max(np.abs(ours[k] - theirs[k]).max() for k in theirs)
    assert scale > 1e-4 and diff <= 1e-5 * scale, f"{name}: {diff:.3g} vs max |grad| {scale:.3g}"


REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
TOKEN_KEYS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")


def test_dpo_sigmoid_matches_trl(ckpt, adapters, hf_tok, pairs, rows, tmp_path):
    """beta 0.5: the margins use most of the 1e-5 budget (rewards are beta x summed log-probs)."""
    t_loss, [t_m], t_ref, t_grads, batch = trl_dpo(ckpt, adapters, hf_tok, pairs, tmp_path, 0.5, "sigmoid")
    assert 0 < t_m["rewards/accuracies"] < 1 and abs(t_m["rewards/margins"]) > 1e-3  # not a vacuous batch
    assert (batch["attention_mask"] == 0).any()  # TRL's batch is padded
    cfg = _cfg("dpo", 0.5)
    for backend, (loss, step_loss, m, ref, grads) in (
            ("torch", ours_torch(torch_ours(ckpt, adapters), rows, cfg, token_stats=True)),
            ("mlx", ours_mlx(mlx_ours(ckpt, adapters), rows, cfg, compiled=True))):
        check(f"loss [{backend}]", loss, t_loss)
        check(f"logged loss [{backend}]", step_loss, t_loss)
        for k in REWARD_KEYS + (TOKEN_KEYS if backend == "torch" else ()):
            check(f"{k} [{backend}]", m[k], t_m[k])
        for k in ("logps/chosen", "logps/rejected"):
            check(f"{k} (summed) [{backend}]", m[k], t_m[k], atol=0, rtol=RTOL_SUM)
        check(f"reference logps [{backend}]", ref, t_ref, atol=0, rtol=RTOL_SUM)
        check_grads(f"grads [{backend}]", grads, t_grads)
    assert t_m["num_tokens"] == int((rows.segment_ids > 0).sum())  # TRL counts every real token of both sides


def test_dpo_robust_label_smoothing_matches_trl(ckpt, adapters, hf_tok, pairs, rows, tmp_path):
    t_loss, [t_m], _, t_grads, _ = trl_dpo(ckpt, adapters, hf_tok, pairs, tmp_path, 0.1, "robust", 0.3)
    cfg = _cfg("dpo", 0.1, "robust", 0.3)
    for backend, (loss, step_loss, m, _, grads) in (("torch", ours_torch(torch_ours(ckpt, adapters), rows, cfg)),
                                                    ("mlx", ours_mlx(mlx_ours(ckpt, adapters), rows, cfg))):
        check(f"robust loss [{backend}]", loss, t_loss)
        check(f"robust logged loss [{backend}]", step_loss, t_loss)
        check(f"robust rewards/margins [{backend}]", m["rewards/margins"], t_m["rewards/margins"])
        check_grads(f"robust grads [{backend}]", grads, t_grads)


def test_cdpo_matches_trl_aot_on_one_pair_batches(ckpt, adapters, hf_tok, pairs, rows, tmp_path):
    """Conservative DPO (sigmoid with label smoothing; TRL 1.16's `sigmoid` ignores label_smoothing) is what
    TRL's `aot` computes on a batch of one pair (its sorts are then the identity): mean over pairs."""
    some = pairs[1:4]  # text and conversational, three one-pair TRL batches
    t_loss, _, _, t_grads, _ = trl_dpo(ckpt, adapters, hf_tok, some, tmp_path, 0.1, "aot", 0.2, True)
    cfg, rows = _cfg("dpo", 0.1, "cdpo", 0.2), pack_pairs(some, SEQ_LEN)
    for backend, (loss, _, _, _, grads) in (("torch", ours_torch(torch_ours(ckpt, adapters), rows, cfg)),
                                            ("mlx", ours_mlx(mlx_ours(ckpt, adapters), rows, cfg))):
        check(f"cdpo loss vs aot [{backend}]", loss, t_loss)
        check_grads(f"cdpo grads [{backend}]", grads, t_grads)


def test_orpo_matches_trl(ckpt, adapters, hf_tok, pairs, rows, tmp_path):
    t_loss, t_m, t_grads = trl_orpo(ckpt, adapters, hf_tok, pairs, tmp_path, 0.1)
    assert 0 < t_m["rewards/accuracies"] < 1
    cfg = _cfg("orpo", 0.1)
    for backend, (loss, step_loss, m, _, grads) in (("torch", ours_torch(torch_ours(ckpt, adapters), rows, cfg)),
                                                    ("mlx", ours_mlx(mlx_ours(ckpt, adapters), rows, cfg))):
        check(f"orpo loss [{backend}]", loss, t_loss)
        check(f"orpo logged loss [{backend}]", step_loss, t_loss)
        for k in REWARD_KEYS + ("logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
            check(f"orpo {k} [{backend}]", m[k], t_m[k])
        check_grads(f"orpo grads [{backend}]", grads, t_grads)


def test_odds_ratio_and_logsigmoid_match_trl_over_their_whole_range():
    """ORPO's odds-ratio term against TRL's own `odds_ratio_loss` with average log-probs on both sides of
    log1mexp's switch at -ln 2, and logsigmoid against torch's far into saturation; numpy, mlx and torch."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from trl.experimental.orpo import ORPOTrainer

    rng = np.random.default_rng(0)
    ac = -np.concatenate([rng.uniform(1e-4, 0.69, 32), rng.uniform(0.7, 30, 32)]).astype(np.float32)
    ar = rng.permutation(ac)
    stub = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    t_losses, _, _, _, t_odds = ORPOTrainer.odds_ratio_loss(stub, torch.tensor(ac), torch.tensor(ar))
    z = np.linspace(-80, 80, 321).astype(np.float32)
    for conv in (np.asarray, mx.array, torch.tensor):
        n = np.ones_like(ac)
        losses, terms = P.orpo_terms(conv(ac), conv(n), conv(ar), conv(n), 0.1)
        check("odds-ratio term vs TRL", np.array(-losses), t_losses.numpy())
        check("log_odds vs TRL", np.array(terms["log_odds"]).mean(), float(t_odds))
        check("logsigmoid vs F.logsigmoid", np.array(P.logsigmoid(conv(z))), F.logsigmoid(torch.tensor(z)).numpy(),
              atol=1e-6)


def test_reference_is_the_base_model_with_adapters_off(ckpt, adapters, rows):
    """Adapters switched off in place == a model that never had adapters (MLX and torch); the precomputed
    reference table (full fine-tuning), row by row and by pair id, == the in-step reference."""
    from mlx_mistral.backends.mlx.loader import load
    from mlx_mistral.backends.torch.loader import load_model

    arrays, ids, valid = _step_inputs(rows)
    n = 2 * len(valid)
    t = [mx.array(a) for a in arrays]
    plain = np.array(mlx_pref.sequence_stats(load(ckpt, dtype="float32")[0], *t[:5], t[6], n)["logp"])
    model = mlx_ours(ckpt, adapters)
    off = np.array(mlx_pref.reference_logps(model, *t[:5], t[6], n))
    on = np.array(mlx_pref.sequence_stats(model, *t[:5], t[6], n)["logp"])
    check("adapters off == base [mlx]", off, plain, atol=0)
    assert np.abs(on - plain)[:2 * len(ids)].min() > 1e-2  # and the adapters do change every sequence
    with mlx_pref.adapters_off(model):
        table = mlx_pref.reference_table(model, rows, batch_size=1)
    check("reference table == in-step [mlx]", table, off[:2 * len(ids)].reshape(-1, 2)[np.argsort(ids)], atol=0,
          rtol=1e-6)

    tt = torch_pref._tensors(arrays, "cpu")
    with torch.no_grad():
        tplain = torch_pref.sequence_stats(load_model(ckpt, dtype="float32", device="cpu"), *tt[:5], tt[6], n)["logp"]
    tmodel = torch_ours(ckpt, adapters)
    toff = torch_pref.reference_logps(tmodel, *tt[:5], tt[6], n)
    check("adapters off == base [torch]", toff.numpy(), tplain.numpy(), atol=0)
    with torch_pref.adapters_off(tmodel):
        check("reference table [torch] == [mlx]", torch_pref.reference_table(tmodel, rows, 2), table, atol=0,
              rtol=1e-6)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_micro_steps_add_up_to_the_global_batch(ckpt, adapters, rows, objective):
    """Rows split over two micro-steps, each loss divided by the global pair (and NLL token) counts, give the
    one-batch loss and gradients: what accumulation relies on (MLX, the trainer's micro_fn)."""
    model = mlx_ours(ckpt, adapters)
    cfg = _cfg(objective, 0.1)
    everything = np.arange(len(rows))
    n_pairs, n_tok = rows.n_pairs, rows.chosen_targets(everything)
    slots = rows.n_pairs

    def micro(idx):
        *arrays, pair_ids = rows.take(idx, slots)
        valid = np.zeros(slots, np.float32)
        valid[:len(pair_ids)] = 1
        t = [mx.array(a) for a in arrays]
        ref = mlx_pref.reference_logps(model, *t[:5], t[6], 2 * slots)
        fn = nn.value_and_grad(model, mlx_pref.micro_fn(cfg, slots))
        (loss, _), g = fn(model, *t, ref, mx.array(valid), mx.array(float(n_pairs)), mx.array(float(n_tok)))
        return loss, g

    whole_loss, whole = micro(everything)
    (l1, g1), (l2, g2) = micro(everything[:1]), micro(everything[1:])
    check(f"{objective}: micro-steps add up (loss)", float(l1 + l2), float(whole_loss), atol=1e-6)
    g = {k: np.array(v) for k, v in tree_flatten(tree_map(mx.add, g1, g2))}
    check_grads(f"{objective}: micro-steps add up", g, {k: np.array(v) for k, v in tree_flatten(whole)})


def test_packed_equals_one_pair_per_row(ckpt, adapters, pairs, rows):
    """Packing isolation: per-sequence log-probs from shared rows == each pair alone in its own row."""
    model = mlx_ours(ckpt, adapters)
    arrays, ids, _ = _step_inputs(rows)
    t = [mx.array(a) for a in arrays]
    packed = np.array(mlx_pref.sequence_stats(model, *t[:5], t[6], 2 * len(ids))["logp"]).reshape(-1, 2)
    packed = packed[np.argsort(ids)].reshape(-1)  # local (row) order -> pair order
    alone = []
    for p in pairs:
        *a, _ = pack_pairs([p], SEQ_LEN).take([0])
        a = [mx.array(x) for x in a]
        alone.append(np.array(mlx_pref.sequence_stats(model, *a[:5], a[6], 2)["logp"]))
    check("packed vs alone [mlx]", packed, np.concatenate(alone), atol=0, rtol=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid", "robust", "cdpo", "orpo"])
def test_losses_are_one_formula_in_numpy_mlx_torch(kind):
    """The same code on numpy (float64), mlx and torch arrays gives the same numbers."""
    rng = np.random.default_rng(0)
    logps = [-rng.uniform(20, 300, 16) for _ in range(4)]
    counts = [rng.integers(5, 40, 16).astype(np.float64) for _ in range(3)]
    results = []
    for conv in (np.asarray, lambda a: mx.array(a.astype(np.float32)), lambda a: torch.tensor(a, dtype=torch.float32)):
        if kind == "orpo":
            loss, m = P.orpo_loss(conv(logps[0]), conv(counts[0]), conv(logps[1]), conv(counts[1]),
                                  conv(-logps[2] * 3), conv(counts[2] * 3), 0.1)
        else:
            loss, m = P.dpo_loss(*(conv(x) for x in logps), 0.5, kind, 0.0 if kind == "sigmoid" else 0.2)
        results.append({"loss": float(loss.item()), **P.to_floats(m)})
    for r in results[1:]:
        for k, v in results[0].items():
            check(f"{kind} {k}: numpy vs mlx/torch", r[k], v, atol=1e-5, rtol=1e-6)
    assert 0 < results[0]["rewards/accuracies"] < 1
