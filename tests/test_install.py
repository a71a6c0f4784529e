"""The package as a user installs it: a wheel built from the sources, installed into a folder of its own, run from
another folder with the repository out of sight. Outputs must land in the current folder, never in the install."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_SUFFIXES = (".py", ".jsonl", ".txt")  # what the package is made of: modules and bundled data


def source_files():
    """Every module and bundled data file under minidpo/, as wheel member names (minidpo/bundled/hh.jsonl)."""
    names = set()
    for folder, dirs, files in os.walk(os.path.join(REPO, "minidpo")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = os.path.relpath(folder, REPO).replace(os.sep, "/")
        names.update(f"{rel}/{f}" for f in files if f.endswith(PACKAGE_SUFFIXES))
    return names


def pip(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"], cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel_and_target(tmp_path_factory):
    """(the wheel built from a copy of the sources, the folder it is installed into)."""
    pytest.importorskip("setuptools", minversion="61", reason="setuptools (the build backend) builds the wheel")
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # a copy, so that building leaves no build/ or egg-info in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    shutil.copytree(os.path.join(REPO, "minidpo"), source / "minidpo",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(root / "dist"), str(source), cwd=root)
    (wheel,) = (root / "dist").glob("minidpo-*.whl")
    target = root / "site"
    pip("install", "--no-deps", "--target", str(target), str(wheel), cwd=root)
    return wheel, target


def run_installed(args, target, cwd):
    """python -m <args> in cwd, importing minidpo only from the install target."""
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def installed_files(target):
    return {os.path.join(folder, f) for folder, dirs, files in os.walk(target) if "__pycache__" not in folder
            for f in files}


def test_wheel_holds_every_module_and_bundled_data_file(wheel_and_target):
    wheel, _ = wheel_and_target
    expected = source_files()
    assert {"minidpo/experiments/imdb.py", "minidpo/bundled/preferences.jsonl"} <= expected  # the oracle is not empty
    with zipfile.ZipFile(wheel) as archive:
        missing = expected - set(archive.namelist())
    assert not missing, f"the wheel leaves out {sorted(missing)}"


def test_installed_package_runs_from_elsewhere_and_writes_only_to_the_current_folder(wheel_and_target, tmp_path):
    _, target = wheel_and_target
    before = installed_files(target)
    locate = "import minidpo, minidpo.bundled as b; print(minidpo.__file__, b.bundled_path('hh.jsonl'))"
    where = run_installed(["-c", locate], target, tmp_path)
    assert all(path.startswith(str(target)) for path in where.split()), where  # not the repository's copy

    assert "--beta" in run_installed(["-m", "minidpo", "--help"], target, tmp_path)
    run_installed(["-m", "minidpo.experiments.imdb", "--scale", "smoke", "--methods", "dpo", "--set", "steps=2",
                   "eval_every=2", "dpo_betas=0.1", "rpo_alpha=0", "train_prompts=4", "eval_prompts=4"],
                  target, tmp_path)
    run_installed(["-m", "minidpo.experiments.tldr", "--scale", "smoke", "--set", "sft_steps=1", "dpo_steps=1",
                   "eval_every=0", "train_pairs=16", "judge_pairs=16", "test_prompts=4", "temperatures=0",
                   "best_of_n=0"],
                  target, tmp_path)

    assert (tmp_path / "runs" / "imdb-smoke" / "results.jsonl").stat().st_size > 0
    assert (tmp_path / "runs" / "tldr-smoke" / "results.jsonl").stat().st_size > 0
    assert installed_files(target) == before  # nothing written inside the installed package
