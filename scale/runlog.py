"""What a run writes as it goes: metrics.jsonl (one line per logged step), TensorBoard when installed, the
trackers of `run.report_to` (through accelerate), and the progress bar."""

from __future__ import annotations

import json
from pathlib import Path


class Logger:
    def __init__(self, out: Path, main: bool, tensorboard: bool, start_step: int, acc=None):
        self.main, self.tb, self.acc = main, None, acc
        self.path = out / "metrics.jsonl"
        if not main:
            return
        out.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # a resumed run drops the lines past its checkpoint
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def log(self, metrics: dict):
        if self.acc is not None:   # accelerate's trackers log on the main process themselves
            self.acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"},
                         step=int(metrics["step"]))
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, metrics["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB since it started (Linux: VmHWM, which, unlike
    getrusage's ru_maxrss, does not count the parent's image that a freshly spawned process briefly shares)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024   # bytes on macOS, KiB elsewhere


def progress(total, start, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="ptlab train", dynamic_ncols=True)
