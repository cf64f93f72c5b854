"""The backend-neutral core: everything that decides *what* is computed, in numpy and plain Python.

Model and training configs, tokenizers and chat formats, datasets and packing, the attention rule, the
training loop with its data order, events, checkpoints and schedule, adapter plans and files, the memory
planner, atomic writes, Hub resolution, and the one table of weight names. Nothing here imports MLX,
torch, click or a module above it (`tests/test_layering.py` checks it); the backends add tensor code.
"""
