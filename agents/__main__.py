"""``python -m agents``: train an agent (the same entry point as ``wide-train`` and ``python train.py``)."""
import sys

from agents.run import main

sys.exit(main(prog="python -m agents"))
