"""`kvrl export`: a head pattern as a folder people share (scores, config.json, a model card, plots), optionally
pushed to the Hugging Face hub."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from kvpress_rl.cli.output import OneLineErrorsCommand, console
from kvpress_rl.evaluators.artifacts import SPARSITIES, export_pattern
from kvpress_rl.hub import check_online, check_repo_id, upload
from kvpress_rl.plan import ESTIMATE_HEAD_DIM, ESTIMATE_SEQ_LEN


@click.command("export", cls=OneLineErrorsCommand)
@click.argument("heads")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="the folder to write (refused if it exists, unless --overwrite)")
@click.option("--model-id", default=None,
              help="the model's hub id (sets or replaces the one in the scores; a published .tsv has none)")
@click.option("--seq-len", default=ESTIMATE_SEQ_LEN, show_default=True, type=int,
              help="sequence length of the card's KV memory table")
@click.option("--head-dim", default=ESTIMATE_HEAD_DIM, show_default=True, type=int,
              help="head dim of the card's KV memory table (the scores do not record it)")
@click.option("--overwrite", is_flag=True, help="replace an existing folder written by an earlier export")
@click.option("--push-to-hub", "push_to", default=None, metavar="OWNER/REPO",
              help="also upload the folder to this model repository")
def export_command(heads: str, output: Path, model_id: str | None, seq_len: int, head_dim: int, overwrite: bool,
                   push_to: str | None) -> None:
    """Write HEADS (a .safetensors, a published .tsv, a head-pattern folder or hf://OWNER/REPO[@REVISION]) as a
    shareable folder: head_scores.safetensors, config.json, a README.md model card with the gate heat map, the
    training curve (from HEADS.run/train_log.jsonl) and the plan's KV memory at a few sparsities."""
    repo = check_repo_id(push_to) if push_to else None
    if repo:
        check_online(f"push to hf://{repo}", "export without --push-to-hub and upload the folder where the hub is "
                     f"reachable (`hf upload {repo} {output}`)")  # refused before anything is written
    written, scores = export_pattern(heads, output, model_id=model_id, seq_len=seq_len, head_dim=head_dim,
                                     overwrite=overwrite, reference=f"hf://{repo}" if repo else None)
    layers, kv_heads = scores.shape
    plans = ", ".join(f"{s:g}" for s in SPARSITIES)
    console.print(f"wrote {escape(str(written))}: {layers} layers x {kv_heads} KV heads, strategy "
                  f"{escape(scores.strategy or '?')}, model {escape(scores.model_id or 'not recorded')}; card with "
                  f"plans at s = {plans}", highlight=False, soft_wrap=True)
    if repo:
        what = f"{scores.strategy or 'head'} pattern for {scores.model_id or 'a model'}"
        url = upload(written, repo, f"kvrl export: {what}")
        console.print(f"pushed to hf://{escape(repo)}: {escape(url)}", highlight=False, soft_wrap=True)
