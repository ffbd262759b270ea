"""The command line of training: ``python train.py``, ``python -m agents`` and ``wide-train`` (``--optimize``: the
Optuna search of :mod:`agents.optimize`). The run itself: :mod:`agents.training`; its settings:
:mod:`agents.run_config`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from agents.common import UsageError
from agents.run_config import build_parser
from agents.training import train

__all__ = ["main"]


def _prog_name() -> str:
    """How the user started training, for --help and command.txt."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if script == "train.py":
        return "python train.py"
    if script in ("__main__.py", "run.py", "-m", "-c", ""):
        return "python -m agents"
    return script  # the console script, wide-train


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``wide-train``, ``python -m agents`` and ``python train.py``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--optimize" in argv:  # Optuna search: its own flags plus these (agents/optimize.py)
        from agents.optimize import main as optimize_main

        return optimize_main([a for a in argv if a != "--optimize"])
    prog = prog or _prog_name()
    args = build_parser(prog).parse_args(argv)
    if not argv:
        args.demo = True
    try:
        run_dir = train(args, argv, prog=prog)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"run folder: {Path(run_dir).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
