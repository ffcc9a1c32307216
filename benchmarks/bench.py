#!/usr/bin/env python
"""lstm_ext.LSTM vs torch.nn.LSTM on a Shakespeare char-LSTM: speed, memory, learning parity.

    python benchmarks/bench.py                 # default run, a few minutes on 2 CPU cores
    python benchmarks/bench.py --quick         # seconds, tiny model
    python benchmarks/bench.py --device cuda --sweep
    python benchmarks/bench.py --help

The logic lives in lstm_ext/shakespeare/bench.py (also ``python -m lstm_ext.shakespeare bench``).
"""
import sys
from pathlib import Path

try:
    from lstm_ext.shakespeare.bench import main
except ImportError:  # run from a source checkout without installing: use the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lstm_ext.shakespeare.bench import main

if __name__ == "__main__":
    sys.exit(main())
