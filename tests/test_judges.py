"""Judges: the API judge against a local fake OpenAI-compatible server; win rates; the offline proxy."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from minidpo.judges import (
    ApiJudge,
    GuardedJudge,
    ProxyJudge,
    degenerate,
    parse_verdict,
    probe_preferences,
    win_rate,
)


class FakeOpenAI(BaseHTTPRequestHandler):
    """Prefers the response that contains GOOD; answers malformed text when asked about MALFORMED;
    fails with the queued status codes first."""

    def do_POST(self):
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        state["requests"].append(body)
        if state["fail"]:
            self.send_response(state["fail"].pop(0))
            self.end_headers()
            return
        content = body["messages"][0]["content"]
        a = content.split("Summary A:\n")[1].split("\n\nSummary B:")[0]
        answer = "I cannot decide." if "MALFORMED" in content else \
            f"Comparison: one is better.\nPreferred: {'A' if 'GOOD' in a or state.get('always_a') else 'B'}"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}],
                              "usage": {"prompt_tokens": 100, "completion_tokens": 12}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    httpd.state = {"requests": [], "fail": []}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def judge(server, tmp_path, task="summary", **kwargs):
    return ApiJudge(task, base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", model="judge-model",
                    api_key="test-key", cache_path=str(tmp_path / "cache.jsonl"), backoff=0.01, **kwargs)


def test_prompt_holds_the_post_both_summaries_and_the_papers_instructions(server, tmp_path):
    j = judge(server, tmp_path)
    j.compare("POST TEXT", "candidate GOOD", "baseline")
    body = server.state["requests"][0]
    content = body["messages"][0]["content"]
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert "Post:\nPOST TEXT" in content and "candidate GOOD" in content and "baseline" in content
    assert content.startswith("Which of the following summaries does a better job")
    assert content.rstrip().endswith('Preferred: <"A" or "B">')


def test_both_orders_are_used_and_verdicts_are_mapped_back(server, tmp_path):
    j = judge(server, tmp_path)
    prompts = [f"post {i}" for i in range(30)]
    wins = j(prompts, [f"GOOD {i}" for i in range(30)], [f"plain {i}" for i in range(30)])
    losses = j(prompts, [f"plain {i}" for i in range(30)], [f"GOOD {i}" for i in range(30)])
    assert wins == [1.0] * 30 and losses == [0.0] * 30  # whatever position the candidate had
    first = [r["messages"][0]["content"].split("Summary A:\n")[1].startswith("GOOD")
             for r in server.state["requests"][:30]]
    assert 5 < sum(first) < 25  # the candidate was shown first in some comparisons, second in others
    # A swapped comparison that shows the same text in the same order is the same question: cached.
    sent = len(server.state["requests"])
    assert sent < 60 and j.tokens == {"prompt": 100 * sent, "completion": 12 * sent}


def test_retries_after_500_and_429(server, tmp_path):
    server.state["fail"] = [500, 429]
    assert judge(server, tmp_path).compare("p", "GOOD", "bad") == 1.0
    assert len(server.state["requests"]) == 3


def test_a_client_error_is_not_retried(server, tmp_path):
    server.state["fail"] = [400]
    with pytest.raises(Exception):
        judge(server, tmp_path).compare("p", "GOOD", "bad")
    assert len(server.state["requests"]) == 1


def test_rerun_hits_the_cache_and_costs_nothing(server, tmp_path):
    args = (["p1", "p2"], ["GOOD a", "b"], ["c", "GOOD d"])
    first = judge(server, tmp_path)(*args)
    n = len(server.state["requests"])
    again = judge(server, tmp_path)
    assert again(*args) == first and len(server.state["requests"]) == n and again.requests == 0


def test_malformed_answers_are_counted_as_such_never_as_wins(server, tmp_path):
    verdicts = judge(server, tmp_path)(["p", "p2"], ["MALFORMED GOOD", "GOOD"], ["x", "y"])
    assert verdicts == [None, 1.0]
    assert win_rate(verdicts) == pytest.approx({"win_rate": 1.0, "low": win_rate([1.0])["low"],
                                                "high": win_rate([1.0])["high"], "n": 1, "invalid": 1})


@pytest.mark.parametrize("answer, field, letter", [
    ("Comparison: x\nPreferred: B", "Preferred", "B"),
    ('Comparison: x\nMore helpful: "A"', "More helpful", "A"),
    ("Comparison: x\nPreferred: A.", "Preferred", "A"),  # a full stop
    ("Comparison: x\n**Preferred:** A", "Preferred", "A"),  # markdown around the field
    ("Comparison: x\nPreferred: **B**", "Preferred", "B"),  # ... or around the letter
    ("Comparison: x\npreferred: a", "Preferred", "A"),  # lower case
    ("comparison: x\nMORE HELPFUL: b.", "More helpful", "B"),
    ("Comparison: x\nPreferred: A, because it keeps the key facts.", "Preferred", "A"),  # an explanation after it
    ("Comparison: x\nPreferred: B (shorter and accurate)", "Preferred", "B"),
    ("Comparison: x\nPreferred: Summary B", "Preferred", "B"),
    ("Comparison: x\n  Preferred : 'A'  ", "Preferred", "A"),
    ("Preferred: A\nWait, on reflection:\nPreferred: B", "Preferred", "B"),  # the last verdict counts
])
def test_parse_verdict_accepts_what_judges_write(answer, field, letter):
    assert parse_verdict(answer, field) == letter


@pytest.mark.parametrize("answer", [
    "Comparison: A is better than B",  # no verdict line
    "Comparison: x\nPreferred: Neither",
    'Comparison: x\nPreferred: <"A" or "B">',  # the template echoed
    "Comparison: x\nPreferred: A or B, hard to say",
    "Comparison: x\npreferred: a summary that is short",  # "a" the article, not a letter
    "Comparison: x\nPreferred:",
    "",
    None,
])
def test_unparseable_verdicts_are_none(answer):
    assert parse_verdict(answer, "Preferred") is None


def test_the_concise_prompt_differs_from_the_standard_only_in_its_question(server, tmp_path):
    from minidpo.judges import SUMMARY_CONCISE_PROMPT, SUMMARY_PROMPT, TEMPLATES
    standard_question, standard_rest = SUMMARY_PROMPT.split("\n\n", 1)
    concise_question, concise_rest = SUMMARY_CONCISE_PROMPT.split("\n\n", 1)
    assert concise_rest == standard_rest and concise_question.startswith(standard_question[:-1])
    assert concise_question.endswith("without including unimportant or irrelevant details? A good summary is both "
                                     "precise and concise.")
    assert TEMPLATES["summary_concise"] == (SUMMARY_CONCISE_PROMPT, "Preferred")
    concise = judge(server, tmp_path, task="summary_concise")
    assert concise.compare("POST", "GOOD summary", "other") == 1.0
    assert server.state["requests"][0]["messages"][0]["content"].startswith(concise_question)
    with pytest.raises(ValueError, match="unknown judge prompt"):
        judge(server, tmp_path, task="concise")


def test_win_rate_counts_ties_as_half_with_a_wilson_interval():
    result = win_rate([1.0, 1.0, 0.0, 0.5, None])
    n, p, z = 4, 2.5 / 4, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert result == pytest.approx({"win_rate": p, "low": centre - half, "high": centre + half, "n": 4, "invalid": 1})
    assert 0 <= result["low"] < p < result["high"] <= 1


def test_proxy_judge_learns_held_out_preferences():
    from minidpo.models import byte_tokenizer, tiny_gpt2
    tokenizer = byte_tokenizer()
    model = tiny_gpt2(seed=0, n_embd=128).eval()
    good = ["thank you, here is how", "sure, happy to help", "great question, first", "yes, you can do it"]
    bad = ["no.", "go away!!", "???", "whatever..."]
    records = [{"prompt": f"Q{i}:", "chosen": " " + good[i % 4] + f" {i}",
                "rejected": " " + bad[(i // 4) % 4] + f" {i}"}
               for i in range(64)]
    proxy = ProxyJudge(model, tokenizer, records)
    assert proxy.accuracy > 0.8
    assert proxy(["Q:"], [" sure, happy to help"], [" go away!!"]) == [1.0]


def test_proxy_judge_scores_each_distinct_response_once_and_the_same_as_alone():
    from minidpo.models import byte_tokenizer, tiny_gpt2
    tokenizer = byte_tokenizer()
    records = [{"prompt": f"Q{i}:", "chosen": f" yes, here is how {i}", "rejected": f" no {i}"} for i in range(16)]
    proxy = ProxyJudge(tiny_gpt2(seed=0, n_embd=64).eval(), tokenizer, records)
    prompts, responses = ["Q:", "Q:", "R:", "Q:"], [" a", " bb", " a", " a"]
    computed, real = [], proxy.features
    proxy.features = lambda ps, rs: computed.extend(zip(ps, rs)) or real(ps, rs)
    scores = proxy.score(prompts, responses)
    assert computed == [("Q:", " a"), ("Q:", " bb"), ("R:", " a")]  # the repeated pair once
    assert proxy.score(["R:", "Q:"], [" a", " bb"]) == [scores[2], scores[1]] and len(computed) == 3  # then none
    alone = [proxy.reward(real([p], [r])).item() for p, r in zip(prompts, responses)]  # oracle: one at a time
    assert scores == pytest.approx(alone, abs=1e-5)


def test_identical_responses_are_ties_for_score_judges():
    from minidpo.models import byte_tokenizer, tiny_gpt2
    tokenizer = byte_tokenizer()
    records = [{"prompt": f"Q{i}:", "chosen": f" yes {i}", "rejected": f" no!! {i}"} for i in range(16)]
    proxy = ProxyJudge(tiny_gpt2(seed=0).eval(), tokenizer, records)
    # the same text in a batch of different length is scored with different padding: still a tie
    assert proxy(["Q:", "Q2:"], [" same answer", " x"], [" same answer", " a much longer other answer"])[0] == 0.5
    assert proxy(["Q:"], [" yes 3"], [" no!! 3"]) == [1.0]


def test_score_verdicts_call_identical_texts_and_round_off_ties():
    from minidpo.judges import _score_verdicts
    assert _score_verdicts(["same", "x", "y", "z"], ["same", "w", "v", "u"],
                           [0.3, 1.00001, 2.0, 0.0], [0.2, 1.0, 1.0, 1.0]) == [0.5, 0.5, 1.0, 0.0]


def test_an_empty_response_loses_to_any_other_whatever_its_score():
    from minidpo.judges import _score_verdicts
    assert _score_verdicts(["", " \n", "answer", ""], ["answer", "answer", "  ", ""],
                           [9.0, 9.0, -9.0, 1.0], [0.0, 0.0, 0.0, 2.0]) == [0.0, 0.0, 1.0, 0.5]


def test_proxy_judge_without_pairs_is_a_clear_error_not_a_crash():
    """At paper scale judge_pairs was 0, and fitting on no pairs failed inside torch.cat."""
    from minidpo.experiments import tldr_hh
    from minidpo.models import byte_tokenizer, tiny_gpt2
    with pytest.raises(ValueError, match="at least 2 preference pairs.*judge_pairs"):
        ProxyJudge(tiny_gpt2(seed=0).eval(), byte_tokenizer(), [])
    for task in ("tldr", "hh"):
        assert tldr_hh.scales(task)["paper"].judge_pairs >= 1000  # the default judge has pairs to fit on


def test_judge_agreement_counts_agreement_with_labels_and_swap_consistency():
    from minidpo.judges import LongerJudge, judge_agreement
    records = [{"prompt": "p", "chosen": "long answer", "rejected": "short"},
               {"prompt": "p", "chosen": "tiny", "rejected": "a longer one"},
               {"prompt": "p", "chosen": "same", "rejected": "SAME"}]
    table = judge_agreement(LongerJudge(), records)
    assert table["pairs"] == 3
    assert table["agreement"]["win_rate"] == pytest.approx((1 + 0 + 0.5) / 3)  # the tie counts one half
    assert table["swap_consistency"]["win_rate"] == 1.0
    first_wins = lambda prompts, candidates, baselines: [1.0] * len(candidates)  # noqa: E731  a position bias
    biased = judge_agreement(first_wins, records)
    assert biased["agreement"]["win_rate"] == 1.0 and biased["swap_consistency"]["win_rate"] == 0.0
    unusable = lambda prompts, candidates, baselines: [None, 1.0, 0.0]  # noqa: E731
    partial = judge_agreement(unusable, records)
    assert partial["agreement"]["n"] == 2 and partial["agreement"]["invalid"] == 1
    assert partial["swap_consistency"]["n"] == 2


def test_repeated_bigrams_is_zero_for_varied_text_and_high_for_a_loop():
    from minidpo.judges import repeated_bigrams
    assert repeated_bigrams("my partner wants to move in") == 0.0
    assert repeated_bigrams("a b a b a b") == pytest.approx(1 - 2 / 5)
    assert repeated_bigrams("") == repeated_bigrams("one") == 0.0


def test_judge_agreement_shows_a_reading_judge_both_orders(server, tmp_path):
    from minidpo.judges import judge_agreement
    records = [{"prompt": f"post {i}", "chosen": f"GOOD {i}", "rejected": f"plain {i}"} for i in range(12)]
    fair = judge_agreement(judge(server, tmp_path), records)
    assert fair["agreement"]["win_rate"] == 1.0 and fair["swap_consistency"]["win_rate"] == 1.0
    server.state["always_a"] = True  # a judge that always prefers the first response it is shown
    biased = judge_agreement(judge(server, tmp_path, seed=1), [dict(r, prompt=r["prompt"] + "!") for r in records])
    assert biased["agreement"]["win_rate"] == 1.0  # chosen shown first every time: it looks perfect...
    assert biased["swap_consistency"]["win_rate"] == 0.0  # ...until the order is swapped


# ---- the degenerate-response rule ----------------------------------------------------------------------------

POST = ("SUBREDDIT: r/relationships\nTITLE: My girlfriend (29F) and I (31M) argue about money\nPOST: We have been "
        "together for 4 months and every weekend ends in the same argument about who pays for dinner. She says I "
        "earn more so I should pay, I say we should split it, and then we do not talk for the rest of the night.\n"
        "TL;DR:")
REFERENCE = " We keep arguing about who pays for dinner; how do we split costs fairly?"
LOOPS = [" 29M, 29M, 29M, 29M, 29M, 29M, 2", " 31F, 4 months, 31F, 4 months, 31F,", " 1000000000000000000000000000000"]
COPY = (" every weekend ends in the same argument about who pays for dinner. She says I earn more so I should pay, I "
        "say we should split it")
EXTRACT = " every weekend ends in the same argument about who pays for dinner."  # one sentence: a fair summary


def test_degenerate_names_the_papers_failure_modes_and_passes_fair_responses():
    # Oracle: labels by hand (the loops are the TL;DR laptop run's own greedy summaries, issue #26).
    assert [degenerate(POST, text) for text in LOOPS] == ["loop", "loop", "loop"]
    assert degenerate(POST, COPY) == "prompt copy"
    assert degenerate(POST, "  \n") == "empty"
    # a list of numbers (the TL;DR laptop run's SFT, Preferred-FT and DPO wrote this one, and the judge preferred it)
    assert degenerate(POST, " 25F, 2018, 2019, 2020, 2021, 20") == "no words"
    fair = [REFERENCE, " Partner and I fight over dinner bills every weekend.", " No.", " Split it 50/50, talk calmly.",
            " 42", " 12 x 12 = 144", " Él va a Perú.",
            " It depends on your budget, but most couples split costs in proportion to income.", EXTRACT]
    assert [degenerate(POST, text) for text in fair] == [None] * len(fair)


class AlwaysCandidate:
    """The worst judge for this rule: it prefers the candidate, whatever it says."""
    reads_both = True

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, candidates, baselines, **kwargs):
        self.calls += len(candidates)
        return [1.0] * len(candidates)


def test_behind_the_rule_a_loop_or_a_prompt_copy_never_beats_the_reference(server, tmp_path):
    bare = AlwaysCandidate()
    guarded = GuardedJudge(bare)
    degenerate_texts = LOOPS + [COPY, ""]
    verdicts = guarded([POST] * 6, degenerate_texts + [" A fair summary of the post."], [REFERENCE] * 6)
    assert verdicts == [0.0] * 5 + [1.0] and bare.calls == 1  # only the fair response reached the judge
    assert guarded.ruled == {"loop": 3, "prompt copy": 1, "empty": 1}
    assert guarded([POST], [LOOPS[0]], [LOOPS[1]]) == [0.5]  # two degenerate responses tie
    # the same with the API judge over the fake server: the degenerate candidates are never sent
    server.state["always_a"] = True  # a judge that always answers "A"
    api = GuardedJudge(judge(server, tmp_path))
    assert api([POST] * 4, degenerate_texts[:4], [REFERENCE] * 4) == [0.0] * 4 and not server.state["requests"]
    assert api.model == "judge-model"  # the inner judge's attributes show through


def test_the_experiments_default_judge_path_is_guarded_and_the_probes_measure_why():
    from minidpo.experiments import tldr_hh
    from minidpo.models import byte_tokenizer, tiny_gpt2
    tokenizer = byte_tokenizer()
    records = [{"prompt": f"Q{i}: what now?", "chosen": f" sure, happy to help with {i}", "rejected": f" no. {i}"}
               for i in range(32)]
    proxy = tldr_hh.make_judge("proxy", "tldr", tiny_gpt2(seed=0, n_embd=128).eval(), tokenizer, records, "unused")
    assert isinstance(proxy, GuardedJudge) and isinstance(proxy.judge, ProxyJudge)
    guarded = probe_preferences(proxy, records[:8])
    assert guarded["loop"] == 0.0 and guarded["prompt copy"] == 0.0  # ruled, whatever the judge would say
    bare = probe_preferences(AlwaysCandidate(), records[:8])
    assert bare == {"loop": 1.0, "prompt copy": 1.0, "truncation": 1.0}  # what an unguarded judge can do


def test_clustered_win_rates_count_each_cluster_once_when_its_verdicts_agree():
    # Oracle: 32 verdicts in 8 clusters of 4 identical ones carry the information of 8 draws: the interval is the
    # Wilson interval of those 8. Singleton clusters change nothing.
    per_cluster = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    verdicts = [v for v in per_cluster for _ in range(4)]
    clustered = win_rate(verdicts, clusters=[k for k in range(8) for _ in range(4)])
    eight = win_rate(per_cluster)
    assert clustered["n"] == 32 and clustered["n_effective"] == pytest.approx(8)
    assert (clustered["low"], clustered["high"]) == pytest.approx((eight["low"], eight["high"]))
    independent = win_rate(verdicts)
    assert win_rate(verdicts, clusters=list(range(32))) == pytest.approx({**independent, "n_effective": 32})
    assert clustered["high"] - clustered["low"] > 1.5 * (independent["high"] - independent["low"])


def test_rouge_l_is_googles_f_measure():
    # Oracle: the longest common subsequence by hand. "the cat sat on the mat" vs "the cat on the mat": LCS 5 words,
    # precision 5/5, recall 5/6, F = 2 * 1 * (5/6) / (1 + 5/6) = 10/11.
    from minidpo.judges import rouge_l
    assert rouge_l(["the cat on the mat", "dogs bark"], ["the cat sat on the mat"] * 2) == pytest.approx([10 / 11, 0.0])


def test_sign_test_is_the_exact_binomial_and_counts_clusters_once():
    from minidpo.judges import binomial_two_sided, sign_test
    # by hand: 6 of 6 prompts one way, p = 2 / 2^6; 5 of 5, 2 / 2^5; an even split, 1
    assert binomial_two_sided(6, 6) == binomial_two_sided(0, 6) == pytest.approx(2 / 64)
    assert binomial_two_sided(5, 5) == pytest.approx(2 / 32) and binomial_two_sided(3, 6) == 1.0
    assert binomial_two_sided(1, 10) == pytest.approx(2 * (1 + 10) / 1024)
    a = [1.0, 1.0, 1.0, 0.5, 0.0, 1.0, None, 0.0]
    b = [0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0]
    result = sign_test(a, b)  # A better on 4, B on 1, equal on 2, one unusable left out
    assert (result["a_better"], result["b_better"], result["equal"]) == (4, 1, 2)
    assert result["p"] == pytest.approx(2 * (1 + 5) / 32)
    # the first three prompts come from one post: one cluster, counted once
    clustered = sign_test(a, b, clusters=["x", "x", "x", "y", "z", "w", "v", "u"])
    assert (clustered["clusters_a_better"], clustered["clusters_b_better"]) == (2, 1)
    assert clustered["p_clusters"] == 1.0 and clustered["a_better"] == 4
