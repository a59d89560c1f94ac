"""The `ptlab` command: train, evaluate, sweep, inspect configs, and regenerate the figures.

Each sub-command is a function taking parsed arguments; `COMMANDS` maps its name to
(add_arguments, run). Heavy imports happen inside the run functions so `ptlab --help` is fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _figures_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("paper_figs"), help="output folder (default paper_figs)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="build only these figures")
    p.add_argument("--fast", action="store_true", help="skip the figures registered as slow (over a minute each)")
    p.add_argument("--list", action="store_true", help="list the registered figures and exit")


def _figures_run(a: argparse.Namespace) -> int:
    from experiments.registry import discover, run_figures

    if a.list:
        for f in discover().values():
            print(f"{f.name:28s} {'(slow) ' if f.slow else ''}{f.reproduces}")
        return 0
    built = run_figures(a.out, only=a.only, include_slow=not a.fast)
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
    plain = p.format_help

    def with_methods() -> str:  # the registry imports torch: only when this help is shown
        from scale.methods import method_names

        p.epilog = (f"method.name: one of {', '.join(method_names())} (scale/methods/), or module:Class for your "
                    "own scale.methods.Method subclass (README, 'Add a method'). Every key: `ptlab config "
                    "schema`; a config with its defaults filled in: `ptlab config show CONFIG`.")
        return plain()

    p.format_help = with_methods


def _train_run(a: argparse.Namespace) -> int:
    from scale.train import main as train_main

    train_main(str(a.config), a.overrides)
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder or hub name")
    p.add_argument("data", type=Path, help="benchmark JSONL: prompt (or messages), answer, optional id")
    p.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--k", type=int, nargs="+", help="pass@k values (default powers of two up to n)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut (default; as the trainer's rollouts)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                   help="hf: model.generate (default); vllm: vLLM's offline engine (a GPU machine with vllm)")
    p.add_argument("--reward", nargs="+", default=["math"],
                   help="math | exact | module:function, or several (summed; default math)")
    p.add_argument("--reward-weights", nargs="+", type=float, help="one weight per --reward (default all 1)")
    p.add_argument("--chat-template", action="store_true", help="wrap text prompts as a user message")
    p.add_argument("--limit", type=int, help="evaluate only the first LIMIT prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("eval_results.json"), help="results JSON")
    p.add_argument("--samples", type=Path, help="also write every completion to this JSONL")


def _eval_run(a: argparse.Namespace) -> int:
    from scale.evaluate import evaluate

    reward = a.reward if len(a.reward) > 1 else a.reward[0]
    r = evaluate(a.model, a.data, n=a.n, ks=a.k, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                 max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, reward=reward,
                 reward_weights=a.reward_weights, chat_template=a.chat_template, limit=a.limit, seed=a.seed,
                 out=a.out, samples=a.samples, backend=a.backend)
    print(json.dumps({"num_prompts": r["num_prompts"], "n": r["n"], **r["metrics"]}))
    print(f"[ptlab eval] results written to {a.out}")
    return 0


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return n


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", type=Path, help="sweep YAML (see experiments/sweep.py for the keys)")
    p.add_argument("--jobs", type=_positive, help="cells run at once (overrides the file's `jobs`)")
    p.add_argument("--dry-run", action="store_true", help="print each cell's command and exit")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished cells")


def _sweep_run(a: argparse.Namespace) -> int:
    from experiments.sweep import main as sweep_main

    return sweep_main(a.sweep, jobs=a.jobs, dry=a.dry_run, report_only=a.report_only)


def _ideal_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="a joint sft_dpo YAML config (e.g. experiments/configs/tiny_mix.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, as for train")
    p.add_argument("--out", type=Path, required=True, help="folder of the two runs and ideal_point.json")


def _ideal_run(a: argparse.Namespace) -> int:
    from experiments.ideal_point import ideal_point

    ideal_point(a.config, a.overrides, a.out)
    return 0


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("show", "schema"),
                   help="show: the resolved config (every default filled in) as YAML; schema: every key with "
                        "its type, default and meaning")
    p.add_argument("config", nargs="?", type=Path, help="YAML config (show; without it: the defaults)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, as for train")


def _config_run(a: argparse.Namespace) -> int:
    from scale.config import load_config, schema

    if a.action == "schema":
        print(schema())
        return 0
    import yaml

    from scale.stages import is_pipeline, load_pipeline

    runs = load_pipeline(a.config, a.overrides) if a.config and is_pipeline(a.config) else \
        [("", load_config(a.config, a.overrides))]
    for name, cfg in runs:
        print(f"# stage {name}\n" if name else "", end="")
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, width=120), end="")
    return 0


COMMANDS = {
    "figures": (_figures_args, _figures_run, "regenerate the figures and tables under paper_figs/"),
    "table1": (_table1_args, _table1_run, "render the HPT paper's Table 1 from the estimator presets"),
    "train": (_train_args, _train_run, "train a model with any method of scale/methods/ (scale/train.py)"),
    "eval": (_eval_args, _eval_run, "pass@k and avg@n of a model on a JSONL benchmark (scale/evaluate.py)"),
    "sweep": (_sweep_args, _sweep_run, "run method x grid x seed training cells and report over seeds"),
    "ideal-point": (_ideal_args, _ideal_run, "f*_SFT and f*_DPO of a joint config: one run per objective "
                    "(MAXRIGHT's inputs, the ideal point)"),
    "config": (_config_args, _config_run, "print a resolved config (show) or every config key (schema)"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ptlab")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ptlab {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help_) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"ptlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a checkpoint or model write that failed (a full disk): one line saying where
        from scale.checkpoint import WriteError

        if not isinstance(e, WriteError):
            raise
        print(f"ptlab {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
