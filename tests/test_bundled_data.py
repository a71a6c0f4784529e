"""The bundled HH and TL;DR sets (written by data/make_data.py): the test split shares no topic, prompt
or response template with training, the pairs compare responses of several levels of quality, the
counts are the ones minidpo/bundled/README.md states, and the generator rewrites every file byte for byte.

A response's template is the response lowercased with every slot filler of every topic (HH: the request,
the two steps, the tip; TL;DR: the faithful summary, the situation, the off-topic sentence, the poster's
age and the duration) replaced by the slot's name, longest filler first: "Sure! To boil an egg, first ..."
becomes "sure! to {t}, first {a}. then {b}. {tip}"."""

import importlib.util
import json
import os
import re

import pytest

from minidpo.bundled import bundled_path
from minidpo.data import load_preferences, load_tldr_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_DIR = os.path.dirname(bundled_path("hh.jsonl"))


def load_make_data():
    spec = importlib.util.spec_from_file_location("make_data", os.path.join(ROOT, "data", "make_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_data = load_make_data()


def slot_pattern(fillers):
    """A function text -> template, for fillers {value: slot name}."""
    fillers = {value.lower(): name for value, name in fillers.items()}
    pattern = re.compile("|".join(re.escape(v) for v in sorted(fillers, key=len, reverse=True)))
    return lambda text: pattern.sub(lambda m: "{" + fillers[m.group(0)] + "}", text.strip().lower())


HH_TEMPLATE = slot_pattern({value: name for task in make_data.TASKS + make_data.HH_TEST_TASKS
                            for value, name in zip(task, ("t", "a", "b", "tip"))})
TLDR_TEMPLATE = slot_pattern({**{post[i]: name for post in make_data.POSTS + make_data.TLDR_TEST_POSTS
                                 for i, name in ((5, "good"), (2, "situation"), (6, "unrelated"))},
                              **{age: "age" for age in make_data.AGES},
                              **{duration: "duration" for duration in make_data.DURATIONS}})


def pairs(name):
    return list(load_preferences(bundled_path(name)))


def sft(name):
    return list(load_tldr_sft(bundled_path(name)))


def responses(records):
    return [r["chosen"] for r in records] + [r["rejected"] for r in records]


def test_a_template_is_the_response_with_its_slots_empty():
    assert HH_TEMPLATE(" Sure! To boil an egg, first put the egg in a pot of cold water and bring it to a boil. Then "
                       "let it simmer for nine minutes, then cool it in cold water. Older eggs are easier to peel."
                       ) == "sure! to {t}, first {a}. then {b}. {tip}"
    assert HH_TEMPLATE(" Ask someone else about how to tie a tie.") == "ask someone else about how to {t}."
    assert TLDR_TEMPLATE(" short version: rice comes out mushy with packet water amounts, how do I fix it?"
                         ) == "short version: {good}"
    assert TLDR_TEMPLATE(" my dog is very cute.") == "{unrelated}"


@pytest.mark.parametrize("train_names,test_names,template", [
    (["hh.jsonl"], ["hh_test.jsonl"], HH_TEMPLATE),
    (["tldr.jsonl", "tldr_sft.jsonl"], ["tldr_test.jsonl", "tldr_sft_test.jsonl"], TLDR_TEMPLATE),
])
def test_test_split_shares_no_prompt_and_no_response_template_with_training(train_names, test_names, template):
    def prompts_and_responses(names):
        records = [r for name in names for r in (sft(name) if "sft" in name else pairs(name))]
        texts = [r["response"] for r in records if "response" in r] + responses([r for r in records if "chosen" in r])
        return {r["prompt"] for r in records}, texts
    train_prompts, train_responses = prompts_and_responses(train_names)
    test_prompts, test_responses = prompts_and_responses(test_names)
    assert not train_prompts & test_prompts
    train_templates, test_templates = {template(t) for t in train_responses}, {template(t) for t in test_responses}
    assert not train_templates & test_templates
    assert not set(map(str.lower, train_responses)) & set(map(str.lower, test_responses))
    # the definition bites: hundreds of responses collapse into a few dozen templates
    assert len(set(train_responses)) >= 5 * len(train_templates)


def test_no_test_topic_is_asked_about_in_training():
    train_prompts = " ".join(r["prompt"] for r in pairs("hh.jsonl"))
    assert not [task[0] for task in make_data.HH_TEST_TASKS if task[0] in train_prompts]
    assert any(task[0] in train_prompts for task in make_data.TASKS)  # the check can find a topic
    train_titles = {json.loads(line)["info"]["title"] for line in open(bundled_path("tldr.jsonl"))}
    test_titles = {json.loads(line)["info"]["title"] for line in open(bundled_path("tldr_test.jsonl"))}
    assert train_titles and test_titles and not train_titles & test_titles


@pytest.mark.parametrize("name,template", [("hh.jsonl", HH_TEMPLATE), ("tldr.jsonl", TLDR_TEMPLATE)])
def test_pairs_compare_several_levels_of_quality(name, template):
    records = pairs(name)
    chosen, rejected = {template(r["chosen"]) for r in records}, {template(r["rejected"]) for r in records}
    assert chosen & rejected  # some template is preferred in one pair and dispreferred in another
    assert len(chosen) >= 8 and len(rejected) >= 8


def test_tldr_sft_files_hold_the_comparisons_posts_with_faithful_references():
    for comparisons, references in (("tldr.jsonl", "tldr_sft.jsonl"), ("tldr_test.jsonl", "tldr_sft_test.jsonl")):
        assert {r["prompt"] for r in sft(references)} == {r["prompt"] for r in pairs(comparisons)}
        assert all("{good}" in TLDR_TEMPLATE(r["response"]) for r in sft(references))
    assert all(json.loads(line)["split"] == "valid1" for line in open(bundled_path("tldr_test.jsonl")))


def readme_counts():
    """{file: (records, distinct prompts, distinct responses, response templates)} from the README's table."""
    counts = {}
    for line in open(os.path.join(BUNDLED_DIR, "README.md"), encoding="utf-8"):
        match = re.match(r"\| `(\w+\.jsonl)` \| (\w+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", line)
        if match:
            counts[match.group(1)] = tuple(int(match.group(i)) for i in range(3, 7))
    return counts


def measured_counts(name):
    if "sft" in name:
        records = sft(name)
        texts, template = [r["response"] for r in records], TLDR_TEMPLATE
    else:
        records = pairs(name)
        texts, template = responses(records), HH_TEMPLATE if name.startswith("hh") else TLDR_TEMPLATE
    return len(records), len({r["prompt"] for r in records}), len(set(texts)), len({template(t) for t in texts})


def test_counts_are_the_readmes():
    claimed = readme_counts()
    assert set(claimed) == {"hh.jsonl", "hh_test.jsonl", "tldr.jsonl", "tldr_test.jsonl", "tldr_sft.jsonl",
                            "tldr_sft_test.jsonl"}
    assert {name: measured_counts(name) for name in claimed} == claimed


def test_make_data_rewrites_every_bundled_file_byte_for_byte(tmp_path):
    written = make_data.write_all(str(tmp_path))
    shipped = sorted(n for n in os.listdir(BUNDLED_DIR) if n.endswith((".jsonl", ".txt")))
    assert written == shipped
    for name in written:
        assert (tmp_path / name).read_bytes() == open(bundled_path(name), "rb").read(), name
