"""Judges that compare a candidate response with a baseline, and win rates with confidence intervals.

The paper measures TL;DR and Anthropic HH by GPT-4's verdict between the method's response and the
dataset's reference (TL;DR) or chosen (HH) response, the two presented in random order. Three judges,
one interface — judge(prompts, candidates, baselines) -> list of verdicts, each 1.0 (candidate wins),
0.5 (tie), 0.0 (baseline wins) or None (no usable verdict: counted apart, never as a win):

    ApiJudge          an OpenAI-compatible chat-completions endpoint with the paper's prompts (TL;DR:
                      standard (S) or concise (C); HH: dialogue); order randomised per comparison,
                      retries with backoff, an on-disk cache, a token count.
    RewardModelJudge  a Hugging Face sequence-classification reward model, named by the user.
    ProxyJudge        offline: a Bradley-Terry reward model (Eq. 2) fitted on held-out preference
                      pairs over a frozen LM's features. A real but weak proxy for human judgement.

FeatureRewardModel, the proxy judge's reward model, also ranks Best-of-N samples (experiments/tldr_hh.py).
judge_agreement() checks any judge against held-out labels (people's, or set by construction offline) and
against itself with the two responses swapped (the offline stand-in for the paper's Table 2); LongerJudge is
its no-model baseline. degenerate() names the responses no judge is asked about (loops, prompt copies, nothing):
GuardedJudge puts every judge behind that rule, and probe_preferences measures why it is needed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import time
import urllib.error
import urllib.request

# The paper's GPT-4 prompts (Appendix C.2), verbatim apart from the placeholders.
SUMMARY_PROMPT = (
    "Which of the following summaries does a better job of summarizing the most important points in the given "
    "forum post?\n\nPost:\n{prompt}\n\nSummary A:\n{a}\n\nSummary B:\n{b}\n\n"
    "FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. SECOND, on "
    'a new line, state only "A" or "B" to indicate your choice. Your response should use the format:\n'
    "Comparison: <one-sentence comparison and explanation>\n"
    'Preferred: <"A" or "B">')

DIALOGUE_PROMPT = (
    "For the following query to a chatbot, which response is more helpful?\n\n"
    "Query: {prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
    "FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. "
    'SECOND, on a new line, state only "A" or "B" to indicate which response is more helpful. Your response should '
    "use the format:\n"
    "Comparison: <one-sentence comparison and explanation>\n"
    'More helpful: <"A" or "B">')

# The concise variant, GPT-4 (C) of section 6.4: the standard prompt (S) favours longer summaries,
# so (C) also asks for precision and brevity. Only its first paragraph differs.
SUMMARY_CONCISE_PROMPT = SUMMARY_PROMPT.replace(
    "in the given forum post?",
    "in the given forum post, without including unimportant or irrelevant details? A good summary is both "
    "precise and concise.")

# name -> (template, the field whose line holds the verdict); "summary" is (S), the paper's default.
TEMPLATES = {"summary": (SUMMARY_PROMPT, "Preferred"), "summary_concise": (SUMMARY_CONCISE_PROMPT, "Preferred"),
             "dialogue": (DIALOGUE_PROMPT, "More helpful")}

_MARKDOWN = re.compile(r"[*_`#>]")  # emphasis, code, headings, quotes: "**Preferred:** A"
_UPPER = re.compile(r"(?:(?i:summary|response)\s+)?([AB])(?![A-Za-z0-9])")  # an explanation may follow
_LOWER = re.compile(r"(?:(?i:summary|response)\s+)?([ab])[\s.!,;:)]*")  # alone: "a" is also a word
_EITHER = re.compile(r"A\W+(?:or|and)\W+B\b", re.IGNORECASE)  # the template echoed, or no decision


def _letter(answer):
    answer = answer.strip().strip("\"'“”‘’()[]<> ")
    if _EITHER.match(answer):
        return None
    upper = _UPPER.match(answer)
    if upper:
        return upper.group(1)
    lower = _LOWER.fullmatch(answer)
    return lower.group(1).upper() if lower else None


def parse_verdict(text, field):
    """'A', 'B' or None from a judge's answer: the letter on the last line that starts with '<field>:'.
    Accepts what judges write around it: markdown ("**Preferred:** A", "Preferred: **A**"), quotes, a
    full stop, "Summary A", any case of the field, a lower-case letter standing alone ("preferred: a"),
    an explanation after an upper-case letter ("Preferred: A, because ..."). Anything else (no such
    line, "Neither", both letters) is None: an unusable verdict, counted apart."""
    verdict = None
    for line in (text or "").splitlines():
        m = re.match(rf"\s*{re.escape(field)}\s*:(.*)$", _MARKDOWN.sub("", line), re.IGNORECASE)
        if m:
            verdict = _letter(m.group(1))
    return verdict


class ApiJudge:
    """GPT-4-style judge over an OpenAI-compatible /chat/completions endpoint (stdlib HTTP only).

    base_url, model and api_key default to MINIDPO_JUDGE_BASE_URL (else https://api.openai.com/v1),
    MINIDPO_JUDGE_MODEL (else gpt-4o) and OPENAI_API_KEY. task names the prompt: "summary" (the
    paper's (S)), "summary_concise" ((C)) or "dialogue". Answers are cached on disk by a hash of
    (model, template, prompt, first response, second response), so a rerun costs nothing."""

    def __init__(self, task="summary", base_url=None, model=None, api_key=None, cache_path="judge_cache.jsonl",
                 seed=0, max_retries=5, backoff=1.0, timeout=60.0):
        if task not in TEMPLATES:
            raise ValueError(f"unknown judge prompt {task!r}; expected one of {sorted(TEMPLATES)}")
        self.template, self.field = TEMPLATES[task]
        base_url = base_url or os.environ.get("MINIDPO_JUDGE_BASE_URL") or "https://api.openai.com/v1"
        self.base_url = base_url.rstrip("/")
        self.model = model or os.environ.get("MINIDPO_JUDGE_MODEL") or "gpt-4o"
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY", "")
        self.cache_path, self.seed = cache_path, seed
        self.max_retries, self.backoff, self.timeout = max_retries, backoff, timeout
        self.tokens = {"prompt": 0, "completion": 0}
        self.requests = 0
        self.cache = {}
        if cache_path and os.path.exists(cache_path):
            from .data import read_jsonl
            self.cache = {entry["key"]: entry["answer"] for entry in read_jsonl(cache_path, with_source=False)}

    def _key(self, content):
        return hashlib.sha256(json.dumps([self.model, content]).encode()).hexdigest()

    def _post(self, content):
        body = json.dumps({"model": self.model, "temperature": 0,
                           "messages": [{"role": "user", "content": content}]}).encode()
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {self.api_key}"})
        for attempt in range(self.max_retries + 1):
            try:
                self.requests += 1
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read())
                usage = reply.get("usage") or {}
                self.tokens["prompt"] += usage.get("prompt_tokens", 0)
                self.tokens["completion"] += usage.get("completion_tokens", 0)
                return reply["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                if e.code not in (429, 500, 502, 503, 504) or attempt == self.max_retries:
                    raise
            except (urllib.error.URLError, TimeoutError):
                if attempt == self.max_retries:
                    raise
            time.sleep(self.backoff * 2 ** attempt)  # exponential backoff: 429 rate limits, 5xx hiccups

    reads_both = True  # it sees both responses at once, so it can prefer a position (see judge_agreement)

    def compare(self, prompt, candidate, baseline, candidate_first=None):
        """1.0 / 0.0 for the candidate winning / losing, None for an unusable answer. The candidate is
        shown first or second at random per comparison (seeded by its texts), or as candidate_first says."""
        if candidate_first is None:
            key_material = f"{prompt}\x00{candidate}\x00{baseline}\x00{self.seed}"
            candidate_first = random.Random(hashlib.sha256(key_material.encode()).hexdigest()).random() < 0.5
        a, b = (candidate, baseline) if candidate_first else (baseline, candidate)
        content = self.template.format(prompt=prompt, a=a, b=b)
        key = self._key(content)
        if key not in self.cache:
            self.cache[key] = self._post(content)
            if self.cache_path:
                with open(self.cache_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "answer": self.cache[key]}) + "\n")
        letter = parse_verdict(self.cache[key], self.field)
        if letter is None:
            return None
        return 1.0 if (letter == "A") == candidate_first else 0.0

    def __call__(self, prompts, candidates, baselines, candidate_first=None):
        return [self.compare(p, c, b, candidate_first) for p, c, b in zip(prompts, candidates, baselines)]


def _score_verdict(candidate, baseline, candidate_score, baseline_score, tolerance=1e-4):
    """1 / 0 / 0.5 by score; identical texts, or scores closer than tolerance (batching round-off), are
    ties. An empty (or whitespace-only) response loses to any other whatever its score: a learned scorer
    has never seen one (no preference pair holds one) and can score it anywhere."""
    if candidate == baseline or abs(candidate_score - baseline_score) <= tolerance:
        return 0.5
    if not candidate.strip() or not baseline.strip():
        return float(bool(candidate.strip()))
    return float(candidate_score > baseline_score)


def best_scored(responses, scores):
    """The index of the highest-scoring response, an empty (or whitespace-only) one only if all are: the
    rule of _score_verdict, for Best-of-N."""
    return max(range(len(responses)), key=lambda k: (bool(responses[k].strip()), scores[k]))


def _score_verdicts(candidates, baselines, candidate_scores, baseline_scores, tolerance=1e-4):
    return [_score_verdict(*args, tolerance) for args in zip(candidates, baselines, candidate_scores, baseline_scores)]


class RewardModelJudge:
    """Compares responses by a Hugging Face sequence-classification reward model's score of
    prompt + response (the first logit), e.g. OpenAssistant/reward-model-deberta-v3-large-v2."""

    def __init__(self, name, device="cpu", batch_size=16, max_length=1024):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.model = AutoModelForSequenceClassification.from_pretrained(name).to(device).eval()
        self.name, self.device, self.batch_size, self.max_length = name, device, batch_size, max_length

    def score(self, prompts, responses):
        import torch
        out = []
        with torch.no_grad():
            for i in range(0, len(prompts), self.batch_size):
                enc = self.tokenizer(prompts[i:i + self.batch_size], responses[i:i + self.batch_size],
                                     return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length).to(self.device)
                out += self.model(**enc).logits[:, 0].float().tolist()
        return out

    def __call__(self, prompts, candidates, baselines):
        return _score_verdicts(candidates, baselines, self.score(prompts, candidates), self.score(prompts, baselines))


class FeatureRewardModel:
    """A Bradley-Terry reward model (Eq. 2): a linear head fitted on preference records ({"prompt",
    "chosen", "rejected"}) over the features of a frozen language model. Its accuracy on a held-out
    quarter of the records, before it is refitted on all of them, is `accuracy`: how far to trust it.
    score(prompts, responses) -> one reward per response."""

    def __init__(self, feature_model, tokenizer, records, l2=0.1, holdout=0.25, seed=0):
        from .reward_model import LinearRewardModel
        self.model, self.tokenizer = feature_model, tokenizer
        records = list(records)
        if len(records) < 2:
            raise ValueError(f"a Bradley-Terry reward model needs at least 2 preference pairs (to fit and to check "
                             f"it), got {len(records)}; for the offline judge set judge_pairs, or choose another "
                             f"judge (--judge api, or a reward model's name)")
        random.Random(seed).shuffle(records)
        cut = len(records) - max(1, int(holdout * len(records)))
        chosen = self.features([r["prompt"] for r in records], [r["chosen"] for r in records])
        rejected = self.features([r["prompt"] for r in records], [r["rejected"] for r in records])
        self.reward = LinearRewardModel(chosen.shape[1]).fit(chosen[:cut], rejected[:cut], l2=l2)
        self.accuracy = self.reward.accuracy(chosen[cut:], rejected[cut:])
        self.reward.fit(chosen, rejected, l2=l2)  # then use every pair
        self.scored = {}  # (prompt, response) -> its reward under the fitted head

    def features(self, prompts, responses):
        from .reward_model import completion_features
        enc = lambda t: self.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        samples = [{"prompt_ids": enc(p), "completion_ids": enc(r)} for p, r in zip(prompts, responses)]
        return completion_features(self.model, samples, self.tokenizer.pad_token_id)

    def score(self, prompts, responses):
        """The reward of each (prompt, response), each distinct pair computed once per model: a run judges the
        same references against every policy and temperature, and the probes share their chosen responses."""
        new = list(dict.fromkeys(pair for pair in zip(prompts, responses) if pair not in self.scored))
        if new:
            rewards = self.reward(self.features([p for p, _ in new], [r for _, r in new])).tolist()
            self.scored.update(zip(new, rewards))
        return [self.scored[pair] for pair in zip(prompts, responses)]


class ProxyJudge(FeatureRewardModel):
    """Offline judge: a FeatureRewardModel fitted on held-out preference records, none of them used
    for training the policies. A real but weak proxy for human judgement (`accuracy` says how weak)."""

    def __call__(self, prompts, candidates, baselines):
        return _score_verdicts(candidates, baselines, self.score(prompts, candidates), self.score(prompts, baselines))


def win_rate(verdicts, z=1.96, clusters=None):
    """Win rate of the candidate with a Wilson score interval, ties counted as half a win and
    unusable verdicts (None) left out. Returns {"win_rate", "low", "high", "n", "invalid"}, and with clusters
    "n_effective".

    clusters: one key per verdict (the post or task a prompt comes from). Verdicts on prompts of one cluster are not
    independent draws, so the interval uses the effective sample size n / deff, with deff the design effect: the
    cluster-robust variance of the mean over the independent-draws one (at least 1). Without clusters, n."""
    kept = [(v, c) for v, c in zip(verdicts, clusters or [None] * len(verdicts)) if v is not None]
    n = len(kept)
    if n == 0:
        return {"win_rate": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0,
                "invalid": len(verdicts), **({"n_effective": 0} if clusters is not None else {})}
    p = sum(v for v, _ in kept) / n
    n_effective = n
    if clusters is not None and 0 < p < 1:
        residuals = {}
        for v, c in kept:
            residuals[c] = residuals.get(c, 0.0) + v - p
        design_effect = (sum(r * r for r in residuals.values()) / n ** 2) / (p * (1 - p) / n)
        n_effective = n / max(1.0, design_effect)
    m = n_effective
    centre = (p + z * z / (2 * m)) / (1 + z * z / m)
    half = z * math.sqrt(p * (1 - p) / m + z * z / (4 * m * m)) / (1 + z * z / m)
    result = {"win_rate": p, "low": centre - half, "high": centre + half, "n": n, "invalid": len(verdicts) - n}
    return result if clusters is None else {**result, "n_effective": n_effective}


def binomial_two_sided(k, n):
    """Exact two-sided sign-test p-value: the chance of a split at least as uneven as k of n under a fair coin."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def sign_test(verdicts_a, verdicts_b, clusters=None):
    """Paired comparison of two policies judged on the same prompts against the same references: on how many
    prompts A's verdict beats B's and B's beats A's (equal verdicts and unusable ones left out), with the exact
    sign-test p-value. With clusters (the post or task of each prompt), also the same test over clusters, each
    counted once by the sign of its summed differences: prompts of one post are not independent draws."""
    pairs = [(a - b, c) for a, b, c in zip(verdicts_a, verdicts_b, clusters or [None] * len(verdicts_a))
             if a is not None and b is not None]
    a_better, b_better = sum(d > 0 for d, _ in pairs), sum(d < 0 for d, _ in pairs)
    result = {"a_better": a_better, "b_better": b_better, "equal": len(pairs) - a_better - b_better,
              "p": binomial_two_sided(a_better, a_better + b_better)}
    if clusters is None:
        return result
    net = {}
    for d, c in pairs:
        net[c] = net.get(c, 0.0) + d
    up, down = sum(v > 0 for v in net.values()), sum(v < 0 for v in net.values())
    return {**result, "clusters_a_better": up, "clusters_b_better": down,
            "p_clusters": binomial_two_sided(up, up + down)}


class LongerJudge:
    """A judge with no model, the baseline for judge_agreement: the longer response (in characters) wins,
    equal lengths tie. The paper found GPT-4's standard TL;DR prompt favours long summaries (section 6.4);
    a judge that agrees with the labels no more than this one adds little beyond length."""

    def __call__(self, prompts, candidates, baselines):
        return [0.5 if len(c) == len(b) else float(len(c) > len(b)) for c, b in zip(candidates, baselines)]


def judge_agreement(judge, records, z=1.96):
    """How far to trust a judge, as the paper's Table 2 asks of GPT-4, on held-out labelled pairs
    ({"prompt", "chosen", "rejected"}, the chosen one preferred by the label: a person's, or by construction):
        agreement         the judge prefers the chosen response (ties half), with a Wilson interval;
        swap_consistency  the verdict is the same with the two responses swapped, i.e.
                          judge(chosen, rejected) + judge(rejected, chosen) == 1, with a Wilson interval.
    A judge that scores each response alone (ProxyJudge, RewardModelJudge) is consistent by construction up
    to batching round-off; a judge that reads both at once (reads_both: ApiJudge) can prefer a position, so
    it is shown the chosen response first, then second. Unusable verdicts (None) are left out of both and
    counted in "invalid"."""
    records = list(records)
    prompts = [r["prompt"] for r in records]
    chosen, rejected = [r["chosen"] for r in records], [r["rejected"] for r in records]
    order = {"candidate_first": True} if getattr(judge, "reads_both", False) else {}
    forward = judge(prompts, chosen, rejected, **order)  # the chosen response shown first
    swapped = judge(prompts, rejected, chosen, **order)  # the chosen response shown second
    consistent = [None if f is None or b is None else float(f + b == 1.0) for f, b in zip(forward, swapped)]
    return {"agreement": win_rate(forward, z), "swap_consistency": win_rate(consistent, z), "pairs": len(records)}


def repeated_bigrams(text):
    """The share of a response's word bigrams that repeat an earlier one: 0 for varied text, near 1 for a
    loop ("31F, 4 months, 31F, 4 months, ..."). A check a learned judge does not make: a degenerate
    response that repeats the right words can score well with a judge that never saw one."""
    words = text.split()
    bigrams = list(zip(words, words[1:]))
    return 1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


# ---- degenerate responses: one rule for every judge -------------------------------------------------------------

LOOP_BIGRAM_SHARE = 0.4  # above this share of repeated word bigrams a response is a loop (varied prose: < 0.15)
CHARACTER_RUN = 8  # one character this many times in a row ("1000000000") is a loop too
# A copy of the prompt: 90% of the response's word 4-grams are the prompt's, over 20+ words or half the prompt (a
# shorter extract, one sentence of a long post, can be a fair summary: a labelled chosen one in the bundled set is).
PROMPT_COPY_SHARE, PROMPT_COPY_WORDS = 0.9, 20
NO_WORDS_TOKENS = 4  # this many numbers and not one word of 2+ letters ("25F, 2018, 2019, 2020, 20") is no answer;
# fewer ("42", "12 x 12 = 144") can be one


def degenerate(prompt, response):
    """Why a response cannot be judged on its content, or None: "empty" (nothing, or only whitespace), "loop" (a
    share of repeated word bigrams above LOOP_BIGRAM_SHARE, or one character CHARACTER_RUN times in a row), "no words"
    (NO_WORDS_TOKENS or more numbers and no word of two letters: a list of numbers), "prompt copy" (PROMPT_COPY_SHARE of
    its word 4-grams the prompt's, over PROMPT_COPY_WORDS words or half the prompt's).
    Learned judges have never seen such texts in a preference pair and can score them anywhere; every judge path
    applies this rule first (GuardedJudge)."""
    text = response.strip()
    if not text:
        return "empty"
    if repeated_bigrams(text) > LOOP_BIGRAM_SHARE or re.search(rf"(\S)\1{{{CHARACTER_RUN - 1},}}", text):
        return "loop"
    words, prompt_words = text.lower().split(), prompt.lower().split()
    if sum(any(c.isdigit() for c in w) for w in words) >= NO_WORDS_TOKENS and not re.search(r"[^\W\d_]{2}", text):
        return "no words"
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    prompt_grams = {tuple(prompt_words[i:i + 4]) for i in range(len(prompt_words) - 3)}
    long_enough = len(words) >= min(PROMPT_COPY_WORDS, max(4, len(prompt_words) / 2))
    if grams and long_enough and sum(g in prompt_grams for g in grams) >= PROMPT_COPY_SHARE * len(grams):
        return "prompt copy"
    return None


class GuardedJudge:
    """Any judge behind the degenerate-response rule: a degenerate response loses to a non-degenerate one, two
    degenerate responses tie, and only comparisons between two judgeable responses reach the judge (an API judge
    is not even asked). `ruled` counts, per reason, the candidate responses ruled so since reset_counts()."""

    def __init__(self, judge):
        self.judge = judge
        self.reads_both = getattr(judge, "reads_both", False)
        self.ruled = {}

    def reset_counts(self):
        self.ruled = {}

    def __call__(self, prompts, candidates, baselines, **kwargs):
        reasons = [(degenerate(p, c), degenerate(p, b)) for p, c, b in zip(prompts, candidates, baselines)]
        for candidate_reason, _ in reasons:
            if candidate_reason:
                self.ruled[candidate_reason] = self.ruled.get(candidate_reason, 0) + 1
        judged = [i for i, (c, b) in enumerate(reasons) if not c and not b]
        inner = self.judge([prompts[i] for i in judged], [candidates[i] for i in judged],
                           [baselines[i] for i in judged], **kwargs) if judged else []
        verdicts = [0.5 if c and b else 0.0 if c else 1.0 if b else None for c, b in reasons]
        for i, verdict in zip(judged, inner):
            verdicts[i] = verdict
        return verdicts

    def __getattr__(self, name):  # accuracy, tokens, requests, model: the inner judge's
        return getattr(self.judge, name)


def degenerate_probes(records):
    """Degenerate versions of held-out labelled pairs' chosen responses, to measure how often a bare judge prefers
    them to the real one: a loop (its first three words, eight times), a copy of the prompt's last 30 words, and a
    truncation (its first third of words: a fair response that stops short, judged on content, not ruled)."""
    probes = []
    for r in records:
        words, prompt_words = r["chosen"].split(), r["prompt"].split()
        for kind, probe in (("loop", words[:3] * 8), ("prompt copy", prompt_words[-30:]),
                            ("truncation", words[:max(1, len(words) // 3)])):
            probes.append({"prompt": r["prompt"], "chosen": r["chosen"], "probe": " " + " ".join(probe), "kind": kind})
    return probes


def probe_preferences(judge, records):
    """{kind: share of probes the judge prefers to the chosen response (ties half)}, kinds as degenerate_probes."""
    probes = degenerate_probes(records)
    verdicts = judge([p["prompt"] for p in probes], [p["probe"] for p in probes], [p["chosen"] for p in probes])
    shares = {}
    for kind in ("loop", "prompt copy", "truncation"):
        valid = [v for v, p in zip(verdicts, probes) if p["kind"] == kind and v is not None]
        shares[kind] = sum(valid) / len(valid) if valid else float("nan")
    return shares


# ---- beside the win rate: measures that need no judge ----------------------------------------------------------

def rouge_l(responses, references):
    """ROUGE-L F-measure of each response against its reference (Google's rouge-score, no stemming): how much of
    the human summary's word sequence a summary shares. A check on the judge that a judge cannot fool with fluency,
    and a weak measure of quality on its own (it rewards copying the reference's words)."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(reference, response)["rougeL"].fmeasure for response, reference in zip(responses, references)]
