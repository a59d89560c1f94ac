"""scale.runlog.peak_rss_mb: a process's own peak memory, not the image of the parent that spawned it."""

import subprocess
import sys

import torch  # noqa: F401  (makes this test process large, as a sweep or figure process is)

from scale.runlog import peak_rss_mb

CHILD = ("from scale.runlog import peak_rss_mb\n"
         "a = peak_rss_mb()\n"
         "x = b'1' * (200 * 2 ** 20)\n"   # writes every page: 200 MiB resident
         "print(a, peak_rss_mb())\n")


def test_peak_rss_counts_the_process_itself_only():
    parent = peak_rss_mb()
    before, after = map(float, subprocess.run([sys.executable, "-c", CHILD], check=True, capture_output=True,
                                              text=True).stdout.split())
    assert 190 <= after - before <= 230
    assert before < 100 < parent    # the child starts small although this parent holds torch
