"""The TL;DR and HH win-rate experiments: what is compared with what, the baselines, and a smoke run."""

import copy
import dataclasses
import json
import os

import pytest
import torch

from minidpo.data import split_hh
from minidpo.experiments import tldr_hh
from minidpo.models import byte_tokenizer, tiny_neox

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def count_model_copies(monkeypatch):
    """Count deep copies of whole models (not of their parts) made from here on."""
    copies, depth, original = [], [0], copy.deepcopy

    def counting(obj, *args, **kwargs):
        if depth[0] == 0 and isinstance(obj, torch.nn.Module):
            copies.append(type(obj).__name__)
        depth[0] += 1
        try:
            return original(obj, *args, **kwargs)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(copy, "deepcopy", counting)
    return copies


@pytest.mark.parametrize("task", ["tldr", "hh"])
def test_smoke_experiment_writes_every_method_and_temperature(tmp_path, task, monkeypatch, capsys):
    copies = count_model_copies(monkeypatch)
    results = tldr_hh.run(task, "smoke", out=str(tmp_path))
    rows = [json.loads(line) for line in open(results)]
    scale = tldr_hh.scales(task)["smoke"]
    temperatures = set(scale.temperatures)
    base = "two_shot" if task == "hh" else "base"
    assert {r["temperature"] for r in rows if r["method"] == base} == (temperatures if task == "hh" else {0.0})
    for method in ("sft" if task == "tldr" else "preferred_ft", "dpo", "ppo"):
        assert {r["temperature"] for r in rows if r["method"] == method} == temperatures
    # TL;DR's Preferred-FT (HH's reference is Preferred-FT already)
    assert {r["temperature"] for r in rows if r["method"] == "preferred_ft" and r["step"] == (
        scale.preferred_ft_steps if task == "tldr" else 0)} == temperatures
    best = [r for r in rows if r["method"] == "best_of_n"]
    assert {r["temperature"] for r in best} == temperatures - {0.0} and {r["best_of"] for r in best} == {4}
    # DPO's win rate along training, at every temperature (Fig. 3 right)
    assert {r["temperature"] for r in rows if r["method"] == "dpo" and 0 < r["step"] < scale.dpo_steps} == temperatures
    assert all(0 <= r["low"] <= r["win_rate"] <= r["high"] <= 1 and r["invalid"] == 0 for r in rows)
    assert (tmp_path / "win_rates.png").stat().st_size > 10_000
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["beta"] == (0.5 if task == "tldr" else 0.1) and summary["sft_loss"][1] < summary["sft_loss"][0]
    assert 0 <= summary["reward_model_heldout_accuracy"] <= 1 and summary["reward_model"]["steps"] > 0
    assert [h["iteration"] for h in summary["ppo_history"]] == list(range(1, scale.ppo_iterations + 1))
    # the judge-agreement table: the run's judge and the length-only baseline, on the task's held-out labelled pairs
    table = summary["judge_agreement"]
    assert set(table) == {"judge", "longer response wins"}
    assert all(entry["pairs"] == scale.agreement_pairs and entry["agreement"]["n"] == scale.agreement_pairs
               for entry in table.values())
    assert table["judge"]["swap_consistency"]["win_rate"] == 1.0  # a score judge has no position to prefer
    # the degenerate-response rule: measured on probes, applied to every verdict, counted per row
    probes = summary["degenerate_probes"]
    assert probes["judge behind the rule"]["loop"] == 0.0 and probes["judge behind the rule"]["prompt copy"] == 0.0
    assert all(set(r["ruled_degenerate"]) <= {"empty", "loop", "no words", "prompt copy"} for r in rows)
    # intervals count the posts / tasks the test prompts come from, not the prompts
    clusters = {tldr_hh.cluster_of(r["prompt"]) for r in tldr_hh.load_data(scale, 0).test}
    assert all(r["n_effective"] <= r["n"] for r in rows) and 1 < len(clusters) < scale.test_prompts
    # beside every win rate: mean length, the degenerate share, and for TL;DR ROUGE-L against the human summary
    assert all(r["mean_words"] >= 0 and 0 <= r["degenerate_share"] <= 1 for r in rows)
    assert all((0 <= r["rouge_l"] <= 1) if task == "tldr" else "rouge_l" not in r for r in rows)
    # what judged the run, and no machine's folders in the summary
    assert summary["judge_record"]["class"] == "ProxyJudge" and summary["judge_record"]["model"].startswith("tiny")
    assert not any(isinstance(v, str) and os.path.isabs(v) for v in summary["config"].values()), summary["config"]
    # one model trained in place from base to SFT to DPO; copies only for what needs its own weights: the offline
    # judge, the reward model's transformer, the baselines' policies (TL;DR Preferred-FT, PPO), each dropped after it
    # is measured, and DPO's reference while it precomputes
    model = type(tldr_hh.load_base(scale, torch.device("cpu"))[0]).__name__
    baselines = [model, model] if task == "tldr" else [model]
    assert copies == [model, "GPTNeoXModel", *baselines, model], copies
    out = capsys.readouterr().out
    assert out.index("memory estimate per stage") < out.index("SFT: loss")
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    if task == "hh":  # every policy's response ends where it would start the next turn
        assert all(tldr_hh.is_single_turn(s["prompt"]) for s in samples)
        assert all("\n\nHuman" not in s["response"] and "\n\nAssistant" not in s["response"] for s in samples)


def test_hh_test_prompts_are_single_turn_and_never_trained_on():
    scale = tldr_hh.scales("hh")["smoke"]
    data = tldr_hh.load_data(scale, seed=0)
    assert len(data.test) == scale.test_prompts
    assert all(tldr_hh.is_single_turn(r["prompt"]) for r in data.test)
    test_prompts = {r["prompt"] for r in data.test}
    assert not test_prompts & {r["prompt"] for r in data.train + data.judge + data.sft}
    # Preferred-FT: the chosen responses of every training record
    assert data.sft == [{"prompt": r["prompt"], "response": r["chosen"]} for r in data.train]
    multi_turn = dataclasses.replace(scale, single_turn=False)
    assert any(not tldr_hh.is_single_turn(r["prompt"]) for r in tldr_hh.load_data(multi_turn, seed=0).train)


def hh_folder(tmp_path):
    """A stand-in for Anthropic/hh-rlhf with a test split sorted by its text, as hub splits often are."""
    lines = open(os.path.join(os.path.dirname(tldr_hh.__file__), "..", "bundled", "hh.jsonl")).read().splitlines()
    folder = tmp_path / "hh"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(lines[:160]) + "\n")
    (folder / "test.jsonl").write_text("\n".join(sorted(lines[160:])) + "\n")
    return str(folder), [json.loads(line) for line in sorted(lines[160:])]


def test_test_prompts_are_a_seeded_sample_of_the_test_split(tmp_path):
    folder, test_rows = hh_folder(tmp_path)
    scale = dataclasses.replace(tldr_hh.scales("hh")["smoke"], dataset=folder, test_split="test", test_prompts=8)
    eligible = [split_hh(r["chosen"], r["rejected"]) for r in test_rows]
    eligible = [(prompt, chosen) for prompt, chosen, _ in eligible if tldr_hh.is_single_turn(prompt)]
    sample = [(r["prompt"], r["reference"]) for r in tldr_hh.load_data(scale, seed=0).test]
    assert len(sample) == 8 and set(sample) <= set(eligible)  # judged against the test split's chosen response
    assert sample != eligible[:8]  # not the first rows
    assert sample == [(r["prompt"], r["reference"]) for r in tldr_hh.load_data(scale, seed=0).test]
    assert sample != [(r["prompt"], r["reference"]) for r in tldr_hh.load_data(scale, seed=1).test]


def tldr_sft_folder(tmp_path):
    rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "tldr_sft.jsonl"))]
    folder = tmp_path / "tldr_sft"
    folder.mkdir()
    for split, part in (("train", rows[:4]), ("test", rows[4:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return str(folder), rows[:4], rows[4:]


def test_tldr_fine_tunes_on_human_summaries_and_is_judged_against_the_test_references(tmp_path):
    folder, train_rows, test_rows = tldr_sft_folder(tmp_path)
    overrides = dict(sft_dataset=folder, sft_test_split="test", test_prompts=2)
    data = tldr_hh.load_data(dataclasses.replace(tldr_hh.scales("tldr")["smoke"], **overrides), seed=0)
    assert data.sft == [{"prompt": r["prompt"], "response": " " + r["label"]} for r in train_rows]
    assert sorted((r["prompt"], r["reference"]) for r in data.test) == sorted(
        (r["prompt"], " " + r["label"]) for r in test_rows)
    assert len(data.train) == 96  # the preference pairs stay the comparisons
    results = tldr_hh.run("tldr", "smoke", out=str(tmp_path / "run"), sft_steps=2, dpo_steps=2, eval_every=0,
                          best_of_n=0, ppo_iterations=0, preferred_ft_steps=0, **overrides)
    methods = {json.loads(line)["method"] for line in open(results)}
    assert methods == {"base", "sft", "dpo"}  # the reference policy is SFT, not Preferred-FT
    baselines = {json.loads(line)["baseline"] for line in open(tmp_path / "run" / "samples.jsonl")}
    assert baselines == {" " + r["label"] for r in test_rows}


def test_two_shot_prompt_template():
    prompt = "\n\nHuman: How do I fix a flat bike tyre?\n\nAssistant:"
    text = tldr_hh.two_shot_prompt(prompt)
    assert text.startswith("\n\nHuman: ") and text.endswith(prompt)
    assert text.count("\n\nHuman:") == 3 and text.count("\n\nAssistant:") == 3
    examples = text[:-len(prompt)]
    first, second = examples.split("\n\nHuman:")[1:]
    for exchange in (first, second):  # two complete single-turn dialogues in the dataset's own format
        question, answer = exchange.split("\n\nAssistant:")
        assert question.strip().endswith("?") and len(answer.strip()) > 40
    assert tldr_hh.end_of_turn(" Patch it.\n\nHuman: thanks\n\nAssistant: ok") == " Patch it."
    assert tldr_hh.end_of_turn(" Patch it.\n\nAssistant: also") == " Patch it."
    assert tldr_hh.end_of_turn(" Patch the tube.  \n") == " Patch the tube."


def test_best_of_n_returns_the_candidate_the_reward_ranks_highest():
    tokenizer = byte_tokenizer()
    model = tiny_neox(vocab_size=len(tokenizer), seed=0).eval()
    prompts = ["Q: one", "Q: two", "Q: three"]
    reward = lambda ps, rs: [sum(r.count(c) for c in "aeiou") - 0.01 * len(r) for r in rs]  # noqa: E731
    best, candidates, scores = tldr_hh.best_of_n(model, tokenizer, prompts, 5, 12, 1.0, reward, seed=3)
    assert [len(c) for c in candidates] == [5, 5, 5]
    assert all(len(set(c)) > 1 for c in candidates)  # n samples, not one sample n times
    for chosen, group, group_scores in zip(best, candidates, scores):
        assert group_scores == reward(None, group) and chosen == group[group_scores.index(max(group_scores))]
    only, _, _ = tldr_hh.best_of_n(model, tokenizer, prompts, 1, 12, 1.0, reward, seed=3)
    assert only == [s["completion"] for s in tldr_hh.generate(model, tokenizer, prompts, 12, 1.0, seed=3)]


def test_best_of_n_picks_an_empty_response_only_when_every_candidate_is_empty(monkeypatch):
    texts = iter(["", " short", " a longer answer", "  ", "", ""])
    monkeypatch.setattr(tldr_hh, "generate", lambda model, tok, prompts, *args, **kwargs: [
        {"completion": next(texts)} for _ in prompts])
    prefers_empty = lambda ps, rs: [10.0 if not r.strip() else len(r) for r in rs]  # noqa: E731
    best, _, _ = tldr_hh.best_of_n(None, None, ["Q: one", "Q: two"], 3, 12, 1.0, prefers_empty)
    assert best[0] == " a longer answer" and not best[1].strip()  # the second prompt had only empty ones


def test_the_judge_copies_the_base_model_only_when_it_needs_it(monkeypatch, tmp_path):
    tokenizer = byte_tokenizer()
    base = tiny_neox(vocab_size=len(tokenizer), seed=0)
    copies = count_model_copies(monkeypatch)
    records = [{"prompt": f"Q{i}:", "chosen": f" yes {i}", "rejected": f" no!! {i}"} for i in range(8)]
    proxy = tldr_hh.make_judge("proxy", "tldr", base, tokenizer, records, str(tmp_path))
    assert len(copies) == 1 and proxy.model is not base and not any(p.requires_grad for p in proxy.model.parameters())
    api = tldr_hh.make_judge("api", "hh", base, tokenizer, [], str(tmp_path))
    concise = tldr_hh.make_judge("api", "tldr", base, tokenizer, [], str(tmp_path), prompt="concise")
    assert len(copies) == 1 and api.field == "More helpful" and "precise and concise" in concise.template
    with pytest.raises(ValueError, match="concise"):
        tldr_hh.make_judge("api", "hh", base, tokenizer, [], str(tmp_path), prompt="concise")
    with pytest.raises(ValueError, match="judge_pairs"):  # paper scale once gave it none and crashed in torch.cat
        tldr_hh.make_judge("proxy", "tldr", base, tokenizer, [], str(tmp_path))


def test_scale_overrides_parse_booleans():
    assert tldr_hh.parse_scale_overrides(["gradient_checkpointing=false", "best_of_n=2", "dtype=bf16"]) == {
        "gradient_checkpointing": False, "best_of_n": 2, "dtype": "bf16"}
    assert tldr_hh.parse_scale_overrides(["single_turn=true"]) == {"single_turn": True}
    with pytest.raises(SystemExit):
        tldr_hh.parse_scale_overrides(["single_turn=yes"])


def test_beta_is_the_papers_unless_given(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(tldr_hh.runs, "train", lambda config, *args, **kwargs: seen.append(config.beta))
    tldr_hh.main("hh", ["--scale", "smoke", "--out", str(tmp_path / "a"), "--set", "dpo_steps=2", "test_prompts=2",
                        "best_of_n=0", "agreement_pairs=2"])
    tldr_hh.main("hh", ["--scale", "smoke", "--out", str(tmp_path / "b"), "--beta", "0.3", "--set", "dpo_steps=2",
                        "test_prompts=2", "best_of_n=0", "agreement_pairs=2"])
    assert seen == [tldr_hh.BETAS["hh"], 0.3]
    assert json.load(open(tmp_path / "b" / "summary.json"))["beta"] == 0.3


def test_agreement_pairs_are_held_out_from_every_policy_and_the_judge():
    scale = tldr_hh.scales("tldr")["smoke"]
    data = tldr_hh.load_data(scale, seed=0)
    assert len(data.agreement) == scale.agreement_pairs
    trained = {r["prompt"] for r in data.train + data.judge} | {r["prompt"] for r in data.sft}
    assert not trained & {r["prompt"] for r in data.agreement}
    assert data.agreement == tldr_hh.load_data(scale, seed=0).agreement  # seeded


def test_best_of_n_and_ppo_use_a_trained_reward_model_that_is_not_the_judge(monkeypatch, tmp_path):
    """Best-of-N and PPO optimise the learned reward model (the reference's transformer + a scalar head, trained on
    the training pairs with Eq. 2), never the judge (a linear probe on the frozen base model, fitted on other pairs):
    a policy tuned against the judge itself would win by construction."""
    from minidpo.reward_model import RewardModel
    seen = {}
    real_best_of_n, real_ppo, real_judge = tldr_hh.best_of_n, tldr_hh.ppo_train, tldr_hh.make_judge

    def spy_best_of_n(*args, **kwargs):
        seen["best_of_n"] = args[6]  # the reward the candidates are ranked by
        return real_best_of_n(*args, **kwargs)

    def spy_ppo(policy, reference, tokenizer, prompts, score_fn, config, **kwargs):
        seen["ppo_score"], seen["ppo_prompts"] = score_fn, prompts
        return real_ppo(policy, reference, tokenizer, prompts, score_fn, config, **kwargs)

    def spy_judge(*args, **kwargs):
        seen["judge"] = real_judge(*args, **kwargs)
        return seen["judge"]

    monkeypatch.setattr(tldr_hh, "best_of_n", spy_best_of_n)
    monkeypatch.setattr(tldr_hh, "ppo_train", spy_ppo)
    monkeypatch.setattr(tldr_hh, "make_judge", spy_judge)
    tldr_hh.run("hh", "smoke", out=str(tmp_path), dpo_steps=1, eval_every=0, temperatures=(1.0,))
    reward = seen["best_of_n"].__self__
    assert isinstance(reward, RewardModel) and not isinstance(seen["judge"].judge, RewardModel)
    judge_weights = {id(p) for p in seen["judge"].judge.model.parameters()}
    assert not judge_weights & {id(p) for p in reward.parameters()}
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["reward_model"]["pairs"]["train"] > summary["reward_model"]["pairs"]["test"] > 0
    data = tldr_hh.load_data(tldr_hh.scales("hh")["smoke"], 0)
    assert set(seen["ppo_prompts"]) == {r["prompt"] for r in data.train}  # never the judge's or the test prompts
    # PPO's rollouts are scored as they are judged: cut at the next turn
    prompt = data.train[0]["prompt"]
    whole, cut = seen["ppo_score"]([{"prompt": prompt, "completion": c} for c in (
        " Soak the beans.\n\nHuman: and then?\n\nAssistant: Cook them.", " Soak the beans.")])
    assert whole == pytest.approx(cut, abs=1e-5)


def test_paper_scale_trains_one_epoch_and_answers_in_256_tokens():
    """The authors run SFT and DPO for one epoch; the steps follow from the data, not a fixed count."""
    paper = tldr_hh.scales("hh")["paper"]
    assert paper.new_tokens == 256 and paper.sft_steps == paper.dpo_steps == 0 and paper.best_of_n == 128
    data = tldr_hh.Data(train=[{}] * 130, judge=[], test=[], sft=[{}] * 64)
    epoch = tldr_hh.one_epoch(paper, data)
    assert (epoch.sft_steps, epoch.dpo_steps) == (1, 3)  # 64 / 64; 130 / 64 with a short last batch
    laptop = tldr_hh.scales("hh")["laptop"]
    assert tldr_hh.one_epoch(laptop, data) == laptop  # fixed step counts stay
