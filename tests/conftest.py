"""Test-wide settings: deterministic hypothesis runs (fixed seeds in CI), float64 by default where asked."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ptlab",
    derandomize=True,  # the same examples on every run: statistical checks keep fixed seeds
    deadline=None,
    max_examples=50,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ptlab"))

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The trainer's token cache (scale/token_store.py) goes to a folder of this test session, not ~/.cache;
# subprocesses (torchrun, accelerate workers) inherit it.
if "PTLAB_DATA_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["PTLAB_DATA_CACHE"] = tempfile.mkdtemp(prefix="ptlab-tokens-")
    atexit.register(shutil.rmtree, os.environ["PTLAB_DATA_CACHE"], True)
