"""Preference sources, each from a fixture in the hub dataset's exact schema, through load_dataset."""

import json
import os
import subprocess
import sys

import datasets
import pytest

from minidpo import data
from minidpo.bundled import bundled_path
from minidpo.models import byte_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FIXTURES = os.path.join(HERE, "fixtures")


def fixture(name):
    return os.path.join(FIXTURES, name)


# ---- Anthropic HH --------------------------------------------------------------------------------

def test_split_hh_keeps_earlier_turns_in_the_prompt():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant: Knock knock."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant: No."
    prompt, c, r = data.split_hh(chosen, rejected)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant:"
    assert (c, r) == (" Knock knock.", " No.")
    assert prompt + c == chosen and prompt + r == rejected


def test_split_hh_rejects_a_transcript_without_an_assistant_turn():
    with pytest.raises(ValueError, match="no '\\\\n\\\\nAssistant:' turn"):
        data.split_hh("\n\nHuman: hello", "\n\nHuman: hello\n\nAssistant: hi")


def test_hh_file_reports_diverging_and_identical_records():
    with pytest.raises(ValueError) as err:
        data.load_preferences(fixture("hh_rlhf.jsonl"))
    text = str(err.value)
    assert "2 of 4 records are invalid" in text
    assert "hh_rlhf.jsonl:3: 'chosen' and 'rejected' transcripts diverge" in text  # file:line, from 1
    assert "hh_rlhf.jsonl:4: 'chosen' and 'rejected' are identical" in text


def test_hh_file_with_skip_invalid_reports_counts(capsys):
    ds = data.load_preferences(fixture("hh_rlhf.jsonl"), skip_invalid=True)
    assert "skipping 2 of 4 invalid records" in capsys.readouterr().out
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 2
    assert ds[1]["prompt"].endswith("\n\nHuman: Sourdough.\n\nAssistant:")
    assert ds[1]["prompt"].startswith("\n\nHuman: Can you help me bake bread?\n\nAssistant: Sure, what kind?")
    assert ds[1]["chosen"] == " Start by feeding your starter the night before."


# ---- TL;DR ---------------------------------------------------------------------------------------

def test_tldr_choice_picks_the_chosen_summary_and_builds_the_papers_prompt():
    ds = data.load_preferences(fixture("tldr_comparisons.jsonl"))
    assert ds[0]["prompt"] == ("SUBREDDIT: r/dogs\nTITLE: Dog barking at night\n"
                               "POST: My dog barks all night and the neighbours complain.\nTL;DR:")
    assert ds[0]["chosen"] == " dog barks at night, neighbours angry, what do I do?"  # choice 0
    assert ds[0]["rejected"] == " I like dogs."
    assert ds[1]["chosen"] == " two job offers, which one should I take?"  # choice 1
    assert ds[1]["rejected"] == " cannot decide"


# ---- SHP -----------------------------------------------------------------------------------------

def test_shp_label_direction_and_score_ratio_filter():
    ds = data.load_preferences(fixture("shp.jsonl"))
    assert ds[0]["chosen"] == " About five minutes."  # labels 1: A preferred
    assert ds[1]["chosen"] == " Use less water and rinse the rice first."  # labels 0: B preferred
    assert ds[1]["prompt"] == "\n\nHuman: Why is my rice mushy?\n\nAssistant:"
    filtered = data.load_preferences(fixture("shp.jsonl"), min_score_ratio=2.0)
    assert len(filtered) == 2 and " Use less water and rinse the rice first." not in filtered["chosen"]


# ---- the hub code path, offline -------------------------------------------------------------------

@pytest.mark.parametrize("hub_name,config_name,fixture_name", [
    ("Anthropic/hh-rlhf", None, "hh_rlhf.jsonl"),
    ("openai/summarize_from_feedback", "comparisons", "tldr_comparisons.jsonl"),
    ("stanfordnlp/SHP", None, "shp.jsonl"),
])
def test_hub_names_load_with_their_config_and_format(monkeypatch, hub_name, config_name, fixture_name):
    calls = []
    real = datasets.load_dataset

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return real("json", data_files=fixture(fixture_name), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = data.load_preferences(hub_name, split="validation", skip_invalid=True)
    assert calls == [(hub_name, config_name, "validation")]
    assert len(ds) >= 2 and all(p.strip() for p in ds["prompt"])


# ---- generic files and validation -----------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_validation_error_names_the_record_and_field(tmp_path):
    rows = [{"prompt": "ok", "chosen": " a", "rejected": " b"},
            {"prompt": "p", "chosen": " a"},
            {"prompt": "p", "chosen": 3, "rejected": " b"},
            {"prompt": "", "chosen": " a", "rejected": " b"},
            {"prompt": "p", "chosen": "   ", "rejected": " b"},
            {"prompt": "p", "chosen": " same", "rejected": " same"}]
    path = write_jsonl(tmp_path / "bad.jsonl", [dict(r, chosen=str(r["chosen"])) if i == 2 else r
                                                for i, r in enumerate(rows)])
    with pytest.raises(ValueError) as err:
        data.load_preferences(path)
    text = str(err.value)
    for expected in ("4 of 6 records", "bad.jsonl:2: missing field 'rejected'", "bad.jsonl:4: 'prompt' is empty",
                     "bad.jsonl:5: 'chosen' is empty", "bad.jsonl:6: 'chosen' and 'rejected' are identical"):
        assert expected in text
    with pytest.raises(ValueError, match="record 2: 'chosen' must be a string, got int"):
        data.validate_preferences(rows)
    # A file can hold a non-string too, when a whole column has another type.
    path = write_jsonl(tmp_path / "numbers.jsonl", [{"prompt": "p", "chosen": " a", "rejected": 1}])
    with pytest.raises(ValueError, match="numbers.jsonl:1: 'rejected' must be a string, got int"):
        data.load_preferences(path)


def test_skip_invalid_reports_the_count_and_keeps_the_rest(tmp_path, capsys):
    rows = [{"prompt": "p", "chosen": " a", "rejected": " b"}, {"prompt": "p", "chosen": " a", "rejected": " a"}]
    assert data.validate_preferences(rows, skip_invalid=True) == rows[:1]
    assert "skipping 1 of 2 invalid records" in capsys.readouterr().out


def test_generic_columns_can_be_renamed_and_csv_and_parquet_load(tmp_path):
    rows = [{"question": "q1", "good": " yes", "bad": " no"}, {"question": "q2", "good": " fine", "bad": " bad"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "p.csv"))
    ds.to_parquet(str(tmp_path / "p.parquet"))
    for name in ("p.csv", "p.parquet"):
        out = data.load_preferences(str(tmp_path / name), prompt_column="question", chosen_column="good",
                                    rejected_column="bad")
        assert out.to_list() == [{"prompt": "q1", "chosen": " yes", "rejected": " no"},
                                 {"prompt": "q2", "chosen": " fine", "rejected": " bad"}]


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_conversational_records_go_through_the_chat_template(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    explicit = {"prompt": [{"role": "user", "content": "Hi?"}],
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "assistant", "content": "Go away."}]}
    implicit = {"chosen": explicit["prompt"] + explicit["chosen"],
                "rejected": explicit["prompt"] + explicit["rejected"]}
    for row in (explicit, implicit):
        path = write_jsonl(tmp_path / "chat.jsonl", [row])
        ds = data.load_preferences(path, format="generic", tokenizer=tokenizer)
        assert ds[0] == {"prompt": "<|user|>Hi?<|end|><|assistant|>", "chosen": "Hello!<|end|>",
                         "rejected": "Go away.<|end|>"}
    with pytest.raises(ValueError, match="chat template"):
        data.load_preferences(path, format="generic")


# ---- IMDb ----------------------------------------------------------------------------------------

def test_a_response_marked_truncated_is_tokenized_without_eos():
    from minidpo.data import tokenize_records
    from minidpo.dpo import tokenize_pair
    tokenizer = byte_tokenizer()
    record = {"prompt": "The film", "chosen": " was long and", "rejected": " was bad."}
    plain = tokenize_pair(tokenizer, record["prompt"], record["chosen"], record["rejected"], 64, 32)
    (cut,), _ = tokenize_records(tokenizer, [{**record, "chosen_truncated": True}], 64, 32)
    assert plain["chosen_input_ids"][-1] == tokenizer.eos_token_id
    assert cut["chosen_input_ids"] == plain["chosen_input_ids"][:-1]
    assert cut["chosen_labels"] == plain["chosen_labels"][:-1]
    assert (cut["rejected_input_ids"], cut["rejected_labels"]) == (plain["rejected_input_ids"],
                                                                    plain["rejected_labels"])  # ended: EOS kept


def test_imdb_prefixes_are_2_to_8_tokens_and_seeded():
    tokenizer = byte_tokenizer()
    ds = data.load_imdb(fixture("imdb.jsonl"), tokenizer=tokenizer, seed=0)
    assert "<br />" not in ds[0]["text"] and ds["label"] == [1, 0, 1]
    for prompt, text in zip(ds["prompt"], ds["text"]):
        n = len(tokenizer(prompt)["input_ids"])
        assert text.startswith(prompt) and 2 <= n <= 8
    assert data.load_imdb(fixture("imdb.jsonl"), tokenizer=tokenizer, seed=0)["prompt"] == ds["prompt"]


# ---- bundled data and the round trip through the command line -------------------------------------

@pytest.mark.parametrize("name,fmt", [("preferences.jsonl", "generic"), ("hh.jsonl", "hh"), ("tldr.jsonl", "tldr")])
def test_bundled_data_loads_valid_in_its_format(name, fmt):
    path = bundled_path(name)
    with open(path) as f:
        columns = json.loads(f.readline()).keys()
    assert data.detect_format(columns) == fmt
    ds = data.load_preferences(path)
    assert len(ds) >= 200


@pytest.mark.parametrize("dataset,extra", [
    (bundled_path("hh.jsonl"), []),
    (bundled_path("tldr.jsonl"), []),
    (bundled_path("preferences.jsonl"), []),
    (fixture("shp.jsonl"), ["--batch_size", "2", "--eval_size", "1"]),
    (fixture("hh_rlhf.jsonl"), ["--batch_size", "2", "--eval_size", "0", "--skip-invalid"]),
])
def test_cli_trains_a_few_steps_on_each_format(tmp_path, tiny_model_dir, dataset, extra):
    args = [sys.executable, "-m", "minidpo", "--model", tiny_model_dir, "--dataset", dataset,
            "--out", str(tmp_path / "out"), "--batch_size", "4", "--max_steps", "2", "--eval_size", "4",
            "--max_length", "256", "--max_prompt_length", "192", "--no-progress", *extra]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f if '"train"' in line]
    assert steps == [1, 2]
