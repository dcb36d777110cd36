"""`kvrl`: list, run and plan KV-cache compression strategies."""

from __future__ import annotations

import inspect
import sys
from dataclasses import replace
from pathlib import Path

import click
import torch
from rich.markup import escape
from rich.text import Text

import kvpress_rl
from kvpress_rl.cli.embedded import embedded_group
from kvpress_rl.cli.evaluation import eval_command
from kvpress_rl.cli.export import export_command
from kvpress_rl.cli.options import check_full_heads_pair, describe_options
from kvpress_rl.cli.output import Column, Layout, OneLineErrorsGroup, console, fitted_table, strategies_with_warnings
from kvpress_rl.cli.report import report_group
from kvpress_rl.cli.select import select_command
from kvpress_rl.cli.serve import serve_command
from kvpress_rl.cli.tune import tune_command
from kvpress_rl.errors import KvrlError
from kvpress_rl.models import _DTYPES
from kvpress_rl.plan import ESTIMATE_HEAD_DIM, ESTIMATE_SEQ_LEN, plan_from_scores
from kvpress_rl.plugins import StrategyEntry, get_strategy
from kvpress_rl.policies import full_head_policy
from kvpress_rl.scores import HeadScores


@click.group(cls=OneLineErrorsGroup)
@click.version_option(kvpress_rl.__version__, prog_name="kvrl", message="%(prog)s %(version)s")
def app() -> None:
    """Head-wise KV cache compression for reasoning LLMs (RLKV and baselines)."""


@app.command("strategies")
@click.argument("name", required=False)
def strategies_command(name: str | None) -> None:
    """List the strategies, or show one strategy's options."""
    found = strategies_with_warnings()
    if name is None:
        console.print(strategies_table(found))
        return
    entry = get_strategy(name, found)
    # user text (a plugin's names, description, doc and option help) is printed as is, never read as markup
    console.print(f"[bold]{escape(name)}[/] ({escape(entry.cls.kind)} strategy, {escape(entry.origin)}): "
                  f"{escape(entry.cls.description)}", highlight=False)
    doc = inspect.cleandoc(entry.cls.__doc__ or "") if isinstance(entry.cls.__doc__, str) else ""
    if doc:
        console.print(doc, highlight=False, markup=False)
    rows = describe_options(entry.cls)
    if not rows:
        console.print("options: none")
        return
    columns = [Column(header=header, cells=tuple(row[i] for row in rows), name=header != "help")
               for i, header in enumerate(("option", "type", "default", "help"))]
    console.print(fitted_table(columns, title=Text(f"options of {name}")))


def strategies_table(found: dict[str, StrategyEntry]):
    """Name, kind and origin whole, the description wrapped beside them; where that would leave the description
    under 24 columns, two columns: the name, then "kind, origin: description"."""
    keys = sorted(found)
    kinds = tuple(str(found[key].cls.kind) for key in keys)
    origins = tuple(str(found[key].origin) for key in keys)
    descriptions = tuple(str(found[key].cls.description) for key in keys)
    columns = [Column(header="name", cells=tuple(keys), name=True),
               Column(header="kind", cells=kinds, name=True, named_when_hidden=False),
               Column(header="origin", cells=origins, name=True, named_when_hidden=False),
               Column(header="description", cells=descriptions, least=24, named_when_hidden=False),
               Column(header="kind, origin: description", named_when_hidden=False,
                      cells=tuple(f"{k}, {o}: {d}" for k, o, d in zip(kinds, origins, descriptions)))]
    return fitted_table(columns, [Layout(shown=(0, 1, 2, 3)), Layout(shown=(0, 4))], title="strategies")


def check_full_heads(full_policy: str | None, full_budget: str | None):
    """The full heads' policy of a hybrid plan (None: they keep everything)."""
    check_full_heads_pair(full_policy, full_budget)
    return None if full_policy is None else full_head_policy(full_policy, full_budget)


@app.command("plan")
@click.option("--heads", required=True, type=click.Path(path_type=Path), help="scores file (.safetensors or .tsv)")
@click.option("--sparsity", required=True, type=float, help="fraction of KV heads to compress, in [0, 1]")
@click.option("--seq-len", default=ESTIMATE_SEQ_LEN, show_default=True, type=int,
              help="sequence length for the memory estimate")
@click.option("--batch", default=1, show_default=True, type=int)
@click.option("--head-dim", default=ESTIMATE_HEAD_DIM, show_default=True, type=int)
@click.option("--dtype", "dtype_name", default="bfloat16", show_default=True, help="float32, float16, bfloat16")
@click.option("--compressed-policy", default="streaming", show_default=True, help="token policy of compressed heads")
@click.option("--rule", "rule", type=click.Choice(["official", "round"]), default="official", show_default=True,
              help="official: RLKV's quantile threshold with seeded tie-breaking noise; round: exactly round(n * s) "
                   "heads")
@click.option("--full-policy", default=None,
              help="a hybrid plan: token policy of the full heads too (streaming, snapkv, h2o, rkv)")
@click.option("--full-budget", default=None,
              help="with --full-policy: what full heads keep, a fraction of the sequence (0.5) or tokens (512)")
def plan_command(heads: Path, sparsity: float, seq_len: int, batch: int, head_dim: int, dtype_name: str,
                 compressed_policy: str, rule: str, full_policy: str | None, full_budget: str | None) -> None:
    """Print the plan for a scores file and its KV memory against the full cache."""
    if dtype_name not in _DTYPES:
        raise KvrlError(f"unknown dtype {dtype_name!r}; accepted: {', '.join(_DTYPES)}")
    if seq_len < 1 or batch < 1 or head_dim < 1:
        raise KvrlError("--seq-len, --batch and --head-dim must be positive")
    full_heads = check_full_heads(full_policy, full_budget)
    scores = HeadScores.load(heads)
    plan = plan_from_scores(scores, sparsity, compressed_policy, rule)  # 80 tokens a compressed head, whatever policy
    if full_heads is not None:
        plan = replace(plan, full_policy=full_heads)
    dtype: torch.dtype = _DTYPES[dtype_name]
    console.print(plan.summary(), highlight=False, markup=False)
    planned = plan.kv_bytes(seq_len, batch, head_dim=head_dim, dtype=dtype)
    full = plan.full_kv_bytes(seq_len, batch, head_dim=head_dim, dtype=dtype)
    rows = [("full", str(full), f"{full / 2**20:.2f}", "100.0%"),
            ("plan", str(planned), f"{planned / 2**20:.2f}", f"{100 * planned / full:.1f}%")]
    columns = [Column(header=header, cells=tuple(row[i] for row in rows), justify="right", name=True)
               for i, header in enumerate(("cache", "bytes", "MiB", "of full"))]
    title = f"KV memory at {seq_len} tokens, batch {batch}, head dim {head_dim}, {dtype_name}"
    console.print(fitted_table(columns, title=title))


app.add_command(select_command)
app.add_command(eval_command)
app.add_command(report_group)
app.add_command(embedded_group)
app.add_command(export_command)
app.add_command(serve_command)
app.add_command(tune_command)


def main() -> None:
    app(prog_name="kvrl")


if __name__ == "__main__":
    sys.exit(main())
