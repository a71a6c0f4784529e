"""python -m minidpo as a user meets it: small data trains, mistakes get one clear line, preemption is survived."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_same_training, read_rows, toy_records
from minidpo import data, dpo, runs
from minidpo.__main__ import build_parser, config_from_args, main
from minidpo.models import byte_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, runner=("-m", "minidpo"), timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *runner, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", toy_records(40))


def common(model_dir, dataset, out, *extra):
    return ["--model", model_dir, "--dataset", dataset, "--out", str(out), "--batch_size", "4", "--lr", "1e-3",
            "--max_length", "64", "--max_prompt_length", "32", "--no-progress", *extra]


def error_of(capsys, argv):
    """main() in this process: (exit status, stderr) — for the mistakes caught before a model loads."""
    status = main(argv)
    return status, capsys.readouterr().err


# ---- small data trains with the defaults ---------------------------------------------------------

def test_twelve_records_train_with_the_default_eval_size(tmp_path, tiny_model_dir):
    dataset = write_jsonl(tmp_path / "my12pairs.jsonl", toy_records(12))
    result = cli(*common(tiny_model_dir, dataset, tmp_path / "out", "--max_steps", "2"))
    assert result.returncode == 0, result.stderr
    assert "held out 1 of 12 records for evaluation" in result.stdout
    assert [r["step"] for r in read_rows(tmp_path / "out") if r["split"] == "train"] == [1, 2]


def test_the_default_eval_size_is_a_tenth_up_to_64():
    assert [len(data.split_records(toy_records(n), None, 0, batch_size=4)[1]) for n in (4, 5, 12, 100, 1000)] == \
        [0, 1, 1, 10, 64]


def test_an_explicit_eval_size_that_leaves_too_few_records_names_it(tmp_path, capsys, pairs, tiny_model_dir):
    status, err = error_of(capsys, common(tiny_model_dir, pairs, tmp_path / "o", "--eval_size", "38"))
    assert status == 2 and err.count("\n") <= 2
    assert "--eval_size 38 leaves 2 of 40 records for training, fewer than --batch_size 4" in err


# ---- mistakes caught before the model loads: one or two lines, exit status 2 ----------------------

@pytest.mark.parametrize("flags,message", [
    (["--loss_type", "kto"], "unknown loss_type 'kto'"),
    (["--max_length", "64", "--max_prompt_length", "64"], "max_prompt_length (64) must be < max_length (64)"),
    (["--dataset", "my_pairs.jsonl"], "no such file: my_pairs.jsonl"),
    (["--model", "./no/such/model"], "no such model folder: ./no/such/model"),
])
def test_mistakes_are_one_line_before_anything_loads(tmp_path, capsys, pairs, flags, message):
    argv = ["--model", "gpt2", "--dataset", pairs, "--out", str(tmp_path / "o"), *flags]
    status, err = error_of(capsys, argv)
    assert status == 2 and err.startswith("error: ") and message in err and err.count("\n") <= 2


def test_an_existing_run_or_a_missing_checkpoint_is_an_error_in_cli_spelling(tmp_path, capsys, pairs):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "metrics.jsonl").write_text("")
    status, err = error_of(capsys, ["--model", "gpt2", "--dataset", pairs, "--out", str(tmp_path / "o")])
    assert status == 2 and "pass --resume to continue it, --overwrite to start afresh" in err
    status, err = error_of(capsys, ["--model", "gpt2", "--dataset", pairs, "--out", str(tmp_path / "o"), "--resume"])
    assert status == 2 and "--resume: no checkpoint in" in err and "--save_every" in err


def test_a_jsonl_syntax_error_names_the_line(tmp_path, tiny_model_dir):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in toy_records(6)) + '{"prompt": "x" "chosen": "y"}\n')
    result = cli(*common(tiny_model_dir, str(path), tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{path}:7: not valid JSON (Expecting ',' delimiter)" in result.stderr


def test_record_errors_name_the_file_and_line(tmp_path, tiny_model_dir):
    records = toy_records(8)
    records[4]["chosen"] = "   "
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    result = cli(*common(tiny_model_dir, path, tmp_path / "o"))
    assert result.returncode == 2 and f"{path}:5: 'chosen' is empty" in result.stderr


def test_when_every_record_fails_alike_the_error_says_the_fix(tmp_path, tiny_model_dir):
    records = [{"prompt": "a long prompt " * (10 + i), "chosen": " yes", "rejected": " no"} for i in range(8)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    result = cli(*common(tiny_model_dir, path, tmp_path / "o", "--max_length", "40", "--max_prompt_length", "39",
                         "--eval_size", "0"))
    assert result.returncode == 2 and "all 8 records fail alike" in result.stderr
    assert "raise --max_length" in result.stderr
    assert "--skip_invalid" not in result.stderr


def test_max_length_beyond_the_models_context(tmp_path, tiny_model_dir, pairs):
    result = cli(*common(tiny_model_dir, pairs, tmp_path / "o", "--max_length", "600"))
    assert result.returncode == 2 and "max_length 600 is beyond the model's context of 512 tokens" in result.stderr
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_eval_split_on_a_single_file_is_an_error(tmp_path, pairs):
    with pytest.raises(ValueError, match="one file, one split: there is no split 'test'"):
        data.load_preferences(pairs, split="test")


def test_a_folder_of_split_files_loads_the_named_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", toy_records(6))
    write_jsonl(tmp_path / "test.jsonl", toy_records(3, seed=1))
    assert len(data.load_preferences(str(tmp_path), split="test")) == 3


def test_data_files_by_split_load_the_named_split(tmp_path):
    files = {"train": write_jsonl(tmp_path / "a.jsonl", toy_records(6)),
             "test": write_jsonl(tmp_path / "b.jsonl", toy_records(3, seed=1))}
    assert len(data.load_preferences("pairs", split="test", data_files=files)) == 3


def test_conversational_records_without_a_prompt_are_detected(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    user = [{"role": "user", "content": "Hi?"}]
    row = {"chosen": user + [{"role": "assistant", "content": "Hello!"}],
           "rejected": user + [{"role": "assistant", "content": "Go away."}]}
    ds = data.load_preferences(write_jsonl(tmp_path / "chat.jsonl", [row]), tokenizer=tokenizer)
    assert (ds[0]["prompt"], ds[0]["chosen"]) == ("<|user|>Hi?<|end|><|assistant|>", "Hello!<|end|>")


def test_a_chat_templated_response_gets_one_end_of_turn(tmp_path):
    from transformers import AutoTokenizer

    from minidpo.models import smollm2_gguf
    folder, name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    user = [{"role": "user", "content": "Hi?"}]
    row = {"chosen": user + [{"role": "assistant", "content": "Hello."}],
           "rejected": user + [{"role": "assistant", "content": "Go away."}]}
    record = data.load_preferences(write_jsonl(tmp_path / "chat.jsonl", [row]), tokenizer=tokenizer)[0]
    pair = dpo.tokenize_pair(tokenizer, record["prompt"], record["chosen"], record["rejected"])
    response = [t for t in pair["chosen_labels"] if t != dpo.IGNORE_INDEX]
    assert tokenizer.decode(response) == "Hello.<|im_end|>\n"
    plain = dpo.tokenize_pair(tokenizer, "Q:", " yes", " no")  # plain text still gets its EOS
    assert plain["chosen_labels"][-1] == tokenizer.eos_token_id


# ---- flags ----------------------------------------------------------------------------------------

def test_dashes_and_underscores_are_both_accepted():
    config, options = config_from_args(["--model", "gpt2", "--max-steps", "7", "--max_length", "99",
                                        "--no-precompute-ref", "--eval-split", "test"])
    assert (config.max_steps, config.max_length, config.precompute_ref, options["eval_split"]) == (7, 99, False, "test")


def test_an_unknown_flag_suggests_the_nearest(capsys):
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(["--model", "gpt2", "--lrr", "1e-5"])
    assert exit_info.value.code == 2 and "unknown flag --lrr; did you mean --lr?" in capsys.readouterr().err


def test_help_shows_the_laptop_defaults_that_apply_without_a_model():
    text = build_parser().format_help()
    assert "default: 1e-06; without --model, the laptop demo's 5e-06" in " ".join(text.split())


def test_a_model_without_a_dataset_says_it_trains_on_the_demo_data(capsys):
    config, _ = config_from_args(["--model", "gpt2"])
    assert config.dataset.endswith("preferences.jsonl") and "no --dataset: training on the bundled demo data" in \
        capsys.readouterr().out


def test_truncation_is_reported_once(tmp_path, tiny_model_dir):
    records = toy_records(12)
    for record in records[:3]:
        record["prompt"] = "x" * 50 + record["prompt"]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    result = cli(*common(tiny_model_dir, path, tmp_path / "o", "--max_steps", "1", "--eval_size", "0"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("truncated 3 of 12 pairs to max_length=64 (prompt cut in 3, response cut in 0)") == 1


# ---- preemption through the command line ---------------------------------------------------------

SIGNAL_SCRIPT = os.path.join(REPO, "tests", "signal_at_step.py")


def test_sigterm_exits_0_with_a_checkpoint_and_resume_matches(tmp_path, tiny_model_dir, pairs):
    args = common(tiny_model_dir, pairs, tmp_path / "stopped", "--max_steps", "6", "--eval_every", "2")
    stopped = cli(*args, runner=(SIGNAL_SCRIPT, "3"))
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped at step 3" in stopped.stdout
    resumed, _ = config_from_args(["--out", str(tmp_path / "stopped"), "--resume"])  # the run's own settings
    assert (resumed.model, resumed.lr, resumed.max_steps, resumed.batch_size) == (tiny_model_dir, 1e-3, 6, 4)
    with pytest.raises(ValueError, match="--lr 0.001 -> 0.01"):
        runs.check_resumed_settings(str(tmp_path / "stopped" / "checkpoint"), dataclasses.asdict(
            config_from_args(["--out", str(tmp_path / "stopped"), "--resume", "--lr", "1e-2"])[0]))
    assert cli("--out", str(tmp_path / "stopped"), "--resume").returncode == 0
    whole = cli(*common(tiny_model_dir, pairs, tmp_path / "whole", "--max_steps", "6", "--eval_every", "2"))
    assert whole.returncode == 0
    assert read_rows(tmp_path / "stopped") == read_rows(tmp_path / "whole")


def test_sigterm_on_one_of_two_ranks_stops_both_at_the_same_step(tmp_path, tiny_model_dir, pairs):
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    args = common(tiny_model_dir, pairs, tmp_path / "stopped", "--max_steps", "4", "--eval_every", "2")
    stopped = cli(*args, runner=(*torchrun, SIGNAL_SCRIPT, "2"))
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    state = torch.load(tmp_path / "stopped" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    assert cli(*args, "--resume", runner=(*torchrun, "-m", "minidpo")).returncode == 0
    whole_args = common(tiny_model_dir, pairs, tmp_path / "whole", "--max_steps", "4", "--eval_every", "2")
    assert cli(*whole_args, runner=(*torchrun, "-m", "minidpo")).returncode == 0
    resumed, whole = read_rows(tmp_path / "stopped"), read_rows(tmp_path / "whole")
    assert [(r["step"], r["split"]) for r in resumed] == [(r["step"], r["split"]) for r in whole]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole], abs=1e-6)
    assert_same_training(tiny_model_dir, tmp_path / "whole" / "final", tmp_path / "stopped" / "final", lr=1e-3, steps=4)
