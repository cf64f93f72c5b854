"""The thesis experiment: generic vs Mistral-aware fine-tuning, measured on a small Mistral trained here.

- `corpus.py`: the offline corpus (this interpreter's standard-library sources), split by package into
  pre-training, fine-tuning and evaluation documents, tokenized with Mistral's v1 tokenizer and remapped
  to a reduced vocabulary.
- `metrics.py`: pure functions: per-token losses of a document run alone, loss by position bucket,
  perplexity, mean and spread over seeds, the markdown tables.
- `run.py`: the experiment (`python -m bench.thesis.run --config bench/thesis/config.yaml`).
"""

import mlx_mistral.backends.mlx  # noqa: F401  (first: it loads OpenBLAS before anything imports mlx.core)
