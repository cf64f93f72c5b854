"""`mlx-mistral upload RUN_OR_EXPORT REPO`: a run or an export to the Hugging Face Hub, with a model card."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("upload")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to commit to, created from main when missing (default: main).")
@click.option("--commit-message", default=None, help="Commit message (default: 'Upload <kind> with mlx-mistral').")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="For an export: the run directory it came from (data, config and metrics go into the card).")
@click.option("--base-model", default=None,
              help="Hub id of the base model for the card and PEFT's base_model_name_or_path (default: the run's).")
@click.option("--license", "license_", default=None,
              help="License id for the card (default: the base model's when it is a Mistral model listed in the card module).")
@click.option("--token", default=None, envvar="HF_TOKEN", help="Hub token (default: HF_TOKEN or `hf auth login`).")
@click.option("--dry-run", is_flag=True, help="Print the files and the model card that would be uploaded; send nothing.")
def upload_cmd(source, repo, private, revision, commit_message, run_dir, base_model, license_, token, dry_run):
    """Upload SOURCE to the Hub repo REPO (owner/name) with a generated README.md model card.

    \b
    SOURCE is one of:
      a run directory with LoRA adapters   PEFT files at the root, mlx-lm's in mlx-lm/, the run's in
                                           mlx-mistral/ (adapters, config.yaml, metrics.jsonl)
      a model directory                    `export hf` or `convert hf-to-mlx` output, as it is
      a GGUF file or a folder of GGUFs     with the Modelfile beside it
    The card has the base model, data, final metrics, config and the commands for transformers (+PEFT),
    mlx-lm, llama.cpp and Ollama. Nothing in SOURCE is written: the upload is staged in a temp folder.
    The repo is created if missing (--private applies then). A run's config.yaml and metrics.jsonl go up
    as they are, local paths included: look at --dry-run first for a public repo.
    """
    from ..recipes.upload import upload

    try:
        r = upload(source, repo, private=private, revision=revision, commit_message=commit_message, token=token,
                   run=run_dir, base_model=base_model, license=license_, dry_run=dry_run)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    for note in r["notes"]:
        click.secho(f"note: {note}", fg="yellow", err=True)
    if dry_run:
        click.echo(r["card"])
        click.echo(f"--- would upload {len(r['files'])} files to {repo} ({r['revision']}):", err=True)
    click.echo(json.dumps({"repo_id": r["repo_id"], "revision": r["revision"], "kind": r["kind"], "url": r["url"],
                           "files": r["files"]}, indent=2))
