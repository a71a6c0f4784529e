"""What notebooks 04 and 05 print of a TL;DR / HH run: the paired comparison is computed from the judged samples."""

from minidpo.experiments import report


def sample(method, step, t, prompt, verdict):
    return {"method": method, "step": step, "temperature": t, "prompt": prompt, "response": "r", "baseline": "b",
            "verdict": verdict}


def test_paired_compares_the_same_prompts_at_each_policys_final_step(capsys):
    prompts = [f"TITLE: post {i // 2}\nPOST: part {i}" for i in range(6)]  # two prompts per post
    dpo_early = [sample("dpo", 2, 0.0, p, 0.0) for p in prompts]  # not the final step: ignored
    dpo = [sample("dpo", 4, 0.0, p, v) for p, v in zip(prompts, [1.0, 1.0, 1.0, 1.0, 0.5, 0.0])]
    sft = [sample("sft", 0, 0.0, p, v) for p, v in zip(prompts, [0.0, 0.0, 0.0, 0.0, 0.5, 1.0])]
    rows = [{"method": m, "step": s, "temperature": 0.0} for m, s in (("dpo", 2), ("dpo", 4), ("sft", 0))]
    run = report.Run("folder", rows, dpo_early + dpo + sft, {})
    (result,) = report.paired(run, "dpo", "sft")
    assert (result["a_better"], result["b_better"], result["equal"]) == (4, 1, 1)
    assert (result["clusters_a_better"], result["clusters_b_better"]) == (2, 1)  # post 2: +0.5 - 1 < 0
    assert result["p"] == 2 * 6 / 32 and "dpo (step 4) vs sft (step 0)" in capsys.readouterr().out
