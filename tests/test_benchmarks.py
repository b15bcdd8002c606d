"""benchmarks/ppo_iteration.py and rollout.py at a tiny size: the phase split clocks every rollout call it names,
and the rollout benchmark times every method in both scenarios; temperature.py's min-p sampler keeps only the
tokens min-p allows; by_prompt.py splits a blind reading by what its prompts already say."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tiny import tiny_gpt, tiny_llama

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def ppo_iteration():
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import `_common` by its bare name
    try:
        import ppo_iteration

        yield ppo_iteration
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_ppo_iteration_clocks_every_rollout_phase(ppo_iteration, tmp_path):
    args = ppo_iteration.Args(preset="tiny", batch=4, prompt_tokens=2, new_tokens=4, min_tokens=2, epochs=1,
                              warmup=1, rounds=2, texts=200, threads=1, out=str(tmp_path / "ppo_iteration.json"))
    ppo_iteration.main(args)
    results = json.loads((tmp_path / "ppo_iteration.json").read_text())["results"]
    for case in ("fixed", "realistic"):
        rec = results[case]
        for r in rec["per_round"]:
            # each clocked call ran inside the rollout: a call the rollout stopped making (a renamed method, a
            # bypassed wrapper) reads 0 and its time would hide in `rollout: other`
            clocked = {k: r[k] for k in ppo_iteration.PHASES[:4]}
            assert min(clocked.values()) > 0, clocked
            # `rollout: other` is the rollout less the clocked calls: below timer noise, two clocks overlapped
            assert r["rollout: other"] > -1e-3, r
        positions = rec["update_positions"]
        assert 0 < positions["real"] <= positions["padded"]
    # fixed: 4 episodes x 4 tokens, the reset step is not one; the update reads each episode once, from its last
    # observation (2 prompt tokens + the first 3 of the response), with no padding: every row is as long
    assert results["fixed"]["tokens_per_iteration"] == 4 * 4
    assert results["fixed"]["update_positions"] == {"real": 4 * 5, "padded": 4 * 5}
    assert results["realistic"]["tokens_per_iteration"] <= 4 * 4
    assert len(results["train_check_s_per_iteration"]) == args.warmup + args.rounds - 2


def test_ppo_iteration_times_full_and_top_k_training(ppo_iteration, tmp_path, monkeypatch):
    # the `--model smollm2` path (cases `all` and `top-k`, each with its own floor) on a tiny Llama in its place
    from rollout import tokenizer

    tok, texts, source, _ = tokenizer(300, 200)
    lm = tiny_llama(len(tok), 3, tie_word_embeddings=True)
    monkeypatch.setattr(ppo_iteration, "load_model", lambda args, device: (tok, lm.eval(), texts, source, 0))
    args = ppo_iteration.Args(model="smollm2", trainable_layers=1, batch=4, prompt_tokens=2, new_tokens=4, epochs=1,
                              warmup=1, rounds=2, threads=1, out=str(tmp_path / "smollm2.json"))
    ppo_iteration.main(args)
    results = json.loads((tmp_path / "smollm2.json").read_text())["results"]
    assert results["cases"]["all"]["trainable_parameters"] > results["cases"]["top-1"]["trainable_parameters"] > 0
    assert results["top-1"]["floor"] == "floor top-1" and results["all"]["floor"] == "floor"
    for case in ("all", "top-1"):  # one fixed-length episode per env: 4 x 4 tokens, 4 rows of 5 positions
        assert results[case]["tokens_per_iteration"] == 16 and results[case]["update_positions"]["real"] == 20
    assert {t["name"] for t in json.loads((tmp_path / "smollm2.json").read_text())["targets"]} == {
        "smollm2_topk_iteration_s", "smollm2_full_over_topk"}


def test_rollout_times_every_method_in_both_scenarios(ppo_iteration, tmp_path, monkeypatch):
    # benchmarks/rollout.py end to end at a tiny size (the GPU check runs it with --device cuda); the fixture puts
    # benchmarks/ on sys.path
    import rollout

    real = rollout.tokenizer
    monkeypatch.setattr(rollout, "tokenizer", lambda vocab: real(vocab, 200))  # a BPE of 200 texts: quick
    args = rollout.Args(preset="tiny", batch=4, prompt_tokens=2, new_tokens=4, min_tokens=2, rounds=2, threads=0,
                        out=str(tmp_path / "rollout.json"))  # threads=0: leave the test process's thread count
    rollout.main(args)
    scenarios = json.loads((tmp_path / "rollout.json").read_text())["results"]["scenarios"]
    assert set(scenarios["realistic"]["median_tokens_per_s"]) == {
        "textenv+gptagent", "textenv, padded re-prefill", "hf generate", "naive recompute"}
    assert len(scenarios["best case"]["median_tokens_per_s"]) == 4
    for scenario in scenarios.values():  # each ratio is the median over rounds of two rates timed in one round
        rates, ratios = scenario["tokens_per_s"], scenario["ratio_vs_generate_by_method"]
        assert all(len(v) == args.rounds for v in rates.values())
        for method, r in ratios.items():
            per_round = sorted(a / b for a, b in zip(rates[method], rates["hf generate"], strict=True))
            assert per_round[0] - 0.01 <= r <= per_round[-1] + 0.01, (method, r, per_round)


def test_min_p_samples_only_tokens_near_the_top_one(ppo_iteration):
    import temperature  # importable while the fixture has benchmarks/ on sys.path

    from agents.gpt_policy import GPTAgent

    class Tok:
        pad_token_id = 0

        def __len__(self):
            return 40

    lm = tiny_gpt(40, width=16, layers=1)
    assert temperature.sampler(lm, Tok(), 0.7, 0.0) is lm  # no min-p: the LM as it is
    with pytest.raises(SystemExit, match="--min-p 1.0 must be in"):
        temperature.sampler(lm, Tok(), 0.7, 1.0)
    agent = temperature.sampler(lm, Tok(), 0.02, 0.3)  # a random tiny LM is near uniform: a low T sharpens it
    plain = GPTAgent(lm, 0, 40, temperature=0.02)
    torch.manual_seed(0)
    obs = torch.randint(1, 40, (8, 6))
    with torch.no_grad():
        probs = torch.softmax(plain._logits(plain._trunk(obs)[0][:, -1]), -1)  # (8, 40) at that T
        allowed = probs >= 0.3 * probs.max(-1, keepdim=True).values
        assert allowed.sum() < allowed.numel() and allowed.sum(-1).min() >= 1  # min-p drops some, never all
        for _ in range(20):
            action, logprob, _, _ = agent.get_action_and_value(obs)
            assert allowed.gather(1, action[:, None]).all() and torch.isfinite(logprob).all()
            agent.reset_cache()


def test_by_prompt_splits_a_reading_by_what_its_prompts_say(ppo_iteration, tmp_path, monkeypatch):
    # the fixture only puts benchmarks/ on sys.path for the bare `_common` import
    import by_prompt

    monkeypatch.setattr(by_prompt, "RESULTS_DIR", tmp_path)
    samples = [{"prompt": "I was"}, {"prompt": "This film was awful"}, {"prompt": " A  lovely"}]  # spaced as a run's
    (tmp_path / "run.json").write_text(json.dumps({"results": {"samples": samples}}))
    reading = tmp_path / "blind_reading" / "reading"
    reading.mkdir(parents=True)
    key = {"0": ["after", 1], "1": ["before", 1], "2": ["after", 0], "3": ["before", 0], "4": ["after", 2],
           "5": ["before", 2]}
    (reading / "key.json").write_text(json.dumps(key))
    (reading / "labels.tsv").write_text("0\tneu\ty\tn\n1\tneg\ty\ty\n2\tpos\ty\ty\n3\tneu\ty\ty\n"
                                        "4\tpos\ty\tn\n5\tpos\ty\ty\n")
    prompts = tmp_path / "prompts"
    by_prompt.prepare(by_prompt.Args("prepare", str(prompts), runs=("reading=run.json",)))
    ids = {p: k for k, p in (line.split("\t") for line in (prompts / "prompts.tsv").read_text().splitlines())}
    assert sorted(ids) == ["A lovely", "I was", "This film was awful"]
    first = {"This film was awful": "neg", "I was": "none", "A lovely": "pos"}
    second = first | {"I was": "pos"}
    for name, labels in (("labels.tsv", first), ("labels_reader2.tsv", second)):
        (prompts / name).write_text("".join(f"{ids[p]}\t{v}\n" for p, v in sorted(labels.items(), key=lambda x: ids[x[0]])))
    labels = by_prompt.prompt_labels(prompts)
    assert labels["A lovely"] == ["pos", "pos"] and labels["I was"] == ["none", "pos"]
    assert by_prompt.agreement(labels) == pytest.approx(2 / 3)
    r = by_prompt.rates(reading, samples, labels)  # by the first prompt reader's labels
    assert r["neg"]["n"] == 1 and r["neg"]["after_positive_0"] == 0 and r["neg"]["before_positive_0"] == 0
    assert r["none"]["after_positive_0"] == 1 and r["none"]["after_all_three_0"] == 1
    assert r["pos"]["after_positive_0"] == 1 and r["pos"]["after_all_three_0"] == 0  # not fluent
    (prompts / "labels_reader2.tsv").write_text("0\tnegative\n")
    with pytest.raises(SystemExit, match="use one of"):
        by_prompt.prompt_labels(prompts)
