"""Small data sets shipped inside the package (written by data/make_data.py; see README.md here)."""

import importlib.resources


def bundled_path(name):
    """The path (a str) of the bundled data file `name`, e.g. bundled_path("hh.jsonl")."""
    path = importlib.resources.files("minidpo.bundled") / name
    if not path.is_file():
        raise FileNotFoundError(f"no bundled data file {name!r} in minidpo/bundled/ (written by data/make_data.py)")
    return str(path)
