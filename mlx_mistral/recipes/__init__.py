"""Recipes: whole jobs put together from the library (core, a backend, export, ui), each one function
that raises ValueError and prints nothing on its own — `finetune` (what `mlx-mistral train` runs),
`evaluate` / `split_loss` (`eval`) and `run_demo` (`demo`). The CLI is a thin layer over them."""
