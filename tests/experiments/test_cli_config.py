"""`ptlab config show|schema` and `ptlab --version`: the schema covers every key with a doc line, `show`
prints a config that loads back to the same one, and `ptlab --help` stays light (no torch import)."""

from __future__ import annotations

import subprocess
import sys

import yaml

from experiments.cli import main as cli
from scale.config import Config, from_dict, load_config, schema_rows
from scale.rundir import flat


def test_schema_covers_every_key_with_a_doc(capsys):
    rows = schema_rows()
    keys = {k for k, *_ in rows}
    assert set(flat(Config().to_dict())) - {"eval.sets"} <= keys   # eval.sets is a list of sections
    assert {"eval.sets[].name", "eval.sets[].kind", "method.options", "run.resume"} <= keys
    assert [k for k, _, _, doc in rows if not doc] == []
    assert cli(["config", "schema"]) == 0
    out = capsys.readouterr().out
    assert "run.lr" in out and "peak learning rate" in out and "sft_dpo" in out


def test_show_prints_the_resolved_config(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: m}\ndata: {path: d}\nmethod: {name: dpo}\nrun: {lr: 0.001}\n")
    assert cli(["config", "show", str(cfg), "run.max_steps=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    want = load_config(cfg, ["run.max_steps=7"])
    assert from_dict(shown) == want and shown["run"]["max_steps"] == 7 and shown["generation"]["top_k"] == 0
    assert cli(["config", "show", str(cfg), "run.lr=fast"]) == 2
    assert "run.lr" in capsys.readouterr().err


def test_version_and_light_help():
    code = ("import sys\nfrom experiments.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "TORCH False" in p.stdout and "config" in p.stdout, p.stdout + p.stderr
    v = subprocess.run([sys.executable, "-m", "experiments.cli", "--version"], capture_output=True, text=True,
                       timeout=120)
    assert v.returncode == 0 and v.stdout.startswith("ptlab ")
