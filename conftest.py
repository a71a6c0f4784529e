"""Settings for every test run, unit tests and notebooks alike (the notebook kernels inherit them)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MINIDPO_SCALE", "smoke")  # notebooks default to laptop scale for people, smoke under pytest
