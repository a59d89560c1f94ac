"""The `ptlab` command: `ptlab figures`, `ptlab table1`, and the commands that later parts add.

Each sub-command is a function taking parsed arguments; `COMMANDS` maps its name to
(add_arguments, run). Heavy imports happen inside the run functions so `ptlab --help` is fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _figures_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("paper_figs"), help="output folder (default paper_figs)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="build only these figures")
    p.add_argument("--all", action="store_true", help="also build the figures marked slow")
    p.add_argument("--list", action="store_true", help="list the registered figures and exit")


def _figures_run(a: argparse.Namespace) -> int:
    from experiments.registry import discover, run_figures

    if a.list:
        for f in discover().values():
            print(f"{f.name:28s} {'(slow) ' if f.slow else ''}{f.reproduces}")
        return 0
    built = run_figures(a.out, only=a.only, include_slow=a.all)
    print(f"[ptlab figures] built {len(built)} figure(s) into {a.out}; index: {a.out / 'README.md'}")
    return 0


def _table1_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("paper_figs"), help="output folder (default paper_figs)")


def _table1_run(a: argparse.Namespace) -> int:
    from experiments.registry import run_figures

    run_figures(a.out, only=["table1"])
    print((a.out / "table1.md").read_text())
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML config (see experiments/configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. run.max_steps=4")


def _train_run(a: argparse.Namespace) -> int:
    from scale.train import main as train_main

    train_main(str(a.config), a.overrides)
    return 0


COMMANDS = {
    "figures": (_figures_args, _figures_run, "regenerate the figures and tables under paper_figs/"),
    "table1": (_table1_args, _table1_run, "render the HPT paper's Table 1 from the estimator presets"),
    "train": (_train_args, _train_run, "train a model: sft, dpo, rl, hpt, luffy, srft, sft_dpo (scale/train.py)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help_) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"ptlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
