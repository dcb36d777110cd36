"""A rank of a data-parallel `kvrl select` or `kvrl eval`: `python -m kvpress_rl.cli.rank REQUEST_FILE`, started by
`launch_data_parallel` under `accelerate launch`. The request file holds the command's request as JSON."""

from __future__ import annotations

import sys
from pathlib import Path

from kvpress_rl.cli.eval_request import EvalRequest
from kvpress_rl.cli.evaluation import run_eval
from kvpress_rl.cli.launch import decode_request, rank_process, watch_rank
from kvpress_rl.cli.output import err_console
from kvpress_rl.cli.select import SelectRequest, run_select
from kvpress_rl.errors import KvrlError

RUNS = {SelectRequest: run_select, EvalRequest: run_eval}


def main(argv: list[str]) -> int:
    watch_rank()  # this rank's failure ends the whole run
    try:
        request = decode_request(Path(argv[0]).read_text(), {kind.__name__: kind for kind in RUNS})
        with rank_process():
            RUNS[type(request)](request)
    except KvrlError as err:  # outside a watched launch (no folder to report to): one line, as every command
        err_console.print(f"Error: {err}", highlight=False, markup=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
