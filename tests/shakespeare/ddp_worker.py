"""Launched by test_ddp.py under torch.distributed.run: ``python -m lstm_ext.shakespeare train``'s
code path, plus this rank's final weights saved as rank<R>.pt in --out for comparison."""
import os
import sys
from pathlib import Path

import torch

from lstm_ext.shakespeare import cli

results = []
train = cli.train


def capture(*args, **kwargs):
    """cli.train, keeping the result (its model) for this script."""
    results.append(train(*args, **kwargs))
    return results[-1]


cli.train = capture
status = cli.main(sys.argv[1:])
out = Path(sys.argv[sys.argv.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)  # rank 0 makes it when saving, maybe after this rank gets here
torch.save(results[0].model.state_dict(), out / f"rank{os.environ['RANK']}.pt")
sys.exit(status)
