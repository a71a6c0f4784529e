"""Reading a TL;DR or HH run (minidpo.experiments.tldr_hh): the tables and samples notebooks 04 and 05 show.

    run = report.open_run("tldr", "laptop", beta=0.5, judge="proxy", seed=0, repo=REPO)  # committed, else run it
    report.win_rate_table(run)                 # guarded win rates with the measures beside them
    report.paired(run, "dpo", "sft")           # per-prompt sign tests: the primary evidence between two policies
    report.show_samples(run, {("dpo", 32): "DPO"}, temperature=0.0)

Everything here reads results.jsonl, samples.jsonl and summary.json; nothing is recomputed but the sign tests.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..judges import sign_test
from . import tldr_hh
from .plots import read_jsonl

VERDICT = {1.0: "WINS", 0.5: "ties", 0.0: "loses", None: "no verdict"}


@dataclass
class Run:
    folder: str
    rows: list  # results.jsonl: one win rate per method, step and temperature
    samples: list  # samples.jsonl: every judged response with its verdict
    summary: dict  # summary.json


def run_name(task, scale, beta, judge, seed):
    return f"{task}_{scale}_beta{beta}_judge-{judge.replace('/', '--')}_seed{seed}"


def finished(folder, scale, beta, judge, seed):
    """Whether a run of exactly these settings completed in `folder`."""
    path = os.path.join(folder, "summary.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        done = json.load(f)
    return (done.get("scale"), done.get("beta"), done.get("judge"), done.get("seed")) == (scale, beta, judge, seed)


def open_run(task, scale, beta, judge, seed, repo):
    """The committed run of these settings (docs/results/<name>) if there is one and the scale is not smoke; else
    runs/<name>, run first unless it finished (smoke always reruns: what CI tests)."""
    name = run_name(task, scale, beta, judge, seed)
    committed, folder = os.path.join(repo, "docs", "results", name), os.path.join(repo, "runs", name)
    if scale != "smoke" and finished(committed, scale, beta, judge, seed):
        folder = committed
    elif scale == "smoke" or not finished(folder, scale, beta, judge, seed):
        tldr_hh.run(task, scale, out=folder, seed=seed, judge=judge, beta=beta)
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    return Run(folder, read_jsonl(os.path.join(folder, "results.jsonl")),
               read_jsonl(os.path.join(folder, "samples.jsonl")), summary)


def final_step(run, method):
    """The last step a method was measured at (DPO's end of training; 0 for the others)."""
    return max(r["step"] for r in run.rows if r["method"] == method)


def win_rate_table(run, methods=None):
    """Each method's final win rate per temperature with its clustered 95% interval and effective n, beside what
    the judge cannot be fooled on: the share of degenerate responses (ruled losses), the mean length in words and,
    for TL;DR, ROUGE-L (F) against the human summary."""
    tldr = any("rouge_l" in r for r in run.rows)
    print(f"{'method':13s} {'T':>4s} {'step':>4s} {'win rate':>8s} {'95% interval':>15s} {'n_eff':>5s} "
          f"{'degenerate':>10s} {'words':>5s}" + (f" {'ROUGE-L':>7s}" if tldr else ""))
    for method in methods or dict.fromkeys(r["method"] for r in run.rows):
        last = final_step(run, method)
        for r in (r for r in run.rows if r["method"] == method and r["step"] == last):
            print(f"{method:13s} {r['temperature']:4.2f} {r['step']:4d} {r['win_rate']:8.3f} "
                  f"[{r['low']:.3f}, {r['high']:.3f}] {r['n_effective']:5.1f} {r['degenerate_share']:10.3f} "
                  f"{r['mean_words']:5.1f}" + (f" {r['rouge_l']:7.3f}" if tldr else ""))


def verdicts(run, method, step, temperature):
    """{prompt: verdict} of one method's responses at one step and temperature."""
    return {s["prompt"]: s["verdict"] for s in run.samples
            if (s["method"], s["step"], s["temperature"]) == (method, step, temperature)}


def paired(run, a, b, step_a=None, step_b=None):
    """Sign tests of policy a against policy b at every temperature both were sampled at: on how many prompts (and
    posts / tasks) a's verdict beats b's and the other way round, with exact p-values. Returns the rows printed."""
    step_a = final_step(run, a) if step_a is None else step_a
    step_b = final_step(run, b) if step_b is None else step_b
    temperatures = sorted({r["temperature"] for r in run.rows if r["method"] == a} &
                          {r["temperature"] for r in run.rows if r["method"] == b})
    print(f"{a} (step {step_a}) vs {b} (step {step_b}), per prompt and per cluster (post / task)")
    print(f"{'T':>4s} {a + ' better':>14s} {b + ' better':>14s} {'equal':>5s} {'p':>6s} "
          f"{'clusters':>9s} {'p':>6s}")
    rows = []
    for t in temperatures:
        va, vb = verdicts(run, a, step_a, t), verdicts(run, b, step_b, t)
        prompts = [p for p in va if p in vb]
        test = sign_test([va[p] for p in prompts], [vb[p] for p in prompts], [tldr_hh.cluster_of(p) for p in prompts])
        rows.append({"temperature": t, **test})
        print(f"{t:4.2f} {test['a_better']:14d} {test['b_better']:14d} {test['equal']:5d} {test['p']:6.3f} "
              f"{test['clusters_a_better']:4d}:{test['clusters_b_better']:<4d} {test['p_clusters']:6.3f}")
    return rows


def show_samples(run, shown, temperature=0.0, prompts=3, width=200, smoke=False):
    """The first `prompts` test prompts with the reference and each shown policy's response and verdict.
    shown: {(method, step): label}. smoke: a tiny random model writes bytes: say how many instead."""
    samples = [s for s in run.samples if s["temperature"] == temperature]
    for prompt in list(dict.fromkeys(s["prompt"] for s in samples))[:prompts]:
        mine = {(s["method"], s["step"]): s for s in samples if s["prompt"] == prompt}
        print("PROMPT ...", prompt[-250:].replace("\n", " "))
        print("  REFERENCE:", next(iter(mine.values()))["baseline"][:width].replace("\n", " "))
        for key, label in shown.items():
            if key not in mine:
                continue
            text = mine[key]["response"][:width].replace("\n", " ").strip() or "(an empty response)"
            text = f"({len(mine[key]['response'])} random bytes)" if smoke else text
            print(f"  {label:16s} {VERDICT[mine[key]['verdict']]:10s} {text}")
        print()
