"""The RLHF report measures what it says, on cases small enough to check by hand."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from agents.rlhf.report import distinct_n, evaluate, report_table, response_logprobs, sample, write_report
from textenv.char_tokenizer import char_tokenizer

PROMPTS = ["ab", "ba a", "b", "aab", "bb b", "a"] * 4


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer("ab ")  # ids: <pad> 0, <eos> 1, <unk> 2, a 3, b 4, ' ' 5


def tiny_lm(vocab: int, seed: int = 0, uniform: bool = False, scale: float = 1.0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2, eos_token_id=1,
                     bos_token_id=1, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        if uniform:  # tied embeddings: zero word embeddings -> zero logits -> uniform next-token distribution
            model.transformer.wte.weight.zero_()
        else:
            model.transformer.wte.weight.mul_(scale)
    return model


def count_a(texts):
    return [float(t.count("a")) for t in texts]


def test_distinct_n_by_hand():
    seqs = [[1, 2, 1, 2], [1, 2]]
    assert distinct_n(seqs, 1) == pytest.approx(2 / 6)
    assert distinct_n(seqs, 2) == pytest.approx(2 / 4)  # (1,2) (2,1) (1,2) | (1,2)
    assert distinct_n([[1], []], 2) == 0.0


def test_kl_is_zero_when_policy_is_reference(tok):
    model = tiny_lm(len(tok))
    m, s = evaluate(model, model, tok, PROMPTS, reward_fn=count_a, max_new_tokens=6, seed=3)
    assert m["kl_mean"] == 0.0
    assert m["reward_mean"] == pytest.approx(np.mean(count_a(s.texts)))
    assert m["reward_median"] == pytest.approx(np.median(count_a(s.texts)))
    assert all(t.startswith(p) for t, p in zip(s.texts, PROMPTS, strict=True))


def test_reference_perplexity_of_a_uniform_model_is_the_vocabulary_size(tok):
    policy, uniform = tiny_lm(len(tok)), tiny_lm(len(tok), uniform=True)
    m, _ = evaluate(policy, uniform, tok, PROMPTS, reward_fn=count_a, max_new_tokens=5, seed=0)
    assert m["ref_perplexity"] == pytest.approx(len(tok), rel=1e-5)


def test_kl_is_sum_of_logprob_differences_and_positive(tok):
    # a sharp policy against a uniform reference: per token KL = log V - H(pi) > 0
    policy, uniform = tiny_lm(len(tok), seed=1, scale=20.0), tiny_lm(len(tok), uniform=True)
    m, s = evaluate(policy, uniform, tok, PROMPTS, reward_fn=count_a, max_new_tokens=6, seed=0)
    # independent route: one unpadded forward per sample
    expected = []
    for p, r in zip(s.prompt_ids, s.response_ids, strict=True):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logits = policy(ids).logits
        lp = torch.log_softmax(logits[0, len(p) - 1 : -1].float(), -1)
        lp = lp.gather(1, torch.tensor(r)[:, None]).squeeze(1)
        expected.append(float(lp.sum()) + len(r) * math.log(len(tok)))
    assert m["kl_mean"] == pytest.approx(np.mean(expected), rel=1e-4, abs=1e-4)
    assert m["kl_mean"] > 0.5


def test_sampling_is_seeded_and_ends_episodes_as_the_env(tok):
    model = tiny_lm(len(tok), seed=2)
    head = torch.nn.Linear(16, len(tok))  # untied head with a large EOS bias: EOS is very likely everywhere
    with torch.no_grad():
        head.bias[tok.eos_token_id] = 6.0
    model.lm_head = head
    a = sample(model, tok, PROMPTS, max_new_tokens=6, min_new_tokens=3, seed=7)
    b = sample(model, tok, PROMPTS, max_new_tokens=6, min_new_tokens=3, seed=7)
    assert a.response_ids == b.response_ids
    for r in a.response_ids:
        # as TextEnv: an EOS before min_new_tokens is an ordinary token; the first one after it ends the episode
        assert len(r) == 6 or (len(r) >= 4 and r[-1] == tok.eos_token_id)
        assert tok.eos_token_id not in r[3:-1]
    assert sum(len(r) == 4 for r in a.response_ids) > len(PROMPTS) // 2  # EOS right after the minimum
    assert sum(tok.eos_token_id in r[:3] for r in a.response_ids) > 0
    lps = response_logprobs(model, tok, a)
    assert all(np.all(lp <= 0) and np.all(np.isfinite(lp)) for lp in lps)
    budgets = [len(r) for r in sample(tiny_lm(len(tok)), tok, PROMPTS * 5, max_new_tokens=(2, 4), seed=0).response_ids]
    assert set(budgets) <= {1, 2, 3, 4} and {2, 3, 4} <= set(budgets)  # (lo, hi) budgets drawn per prompt


def test_write_report_files(tok, tmp_path):
    model = tiny_lm(len(tok))
    before = evaluate(model, model, tok, PROMPTS, reward_fn=count_a, judge_fn=lambda t: [0.9] * len(t),
                      max_new_tokens=4, seed=0)
    after = evaluate(model, model, tok, PROMPTS, reward_fn=count_a, judge_fn=lambda t: [0.1] * len(t),
                     max_new_tokens=4, seed=1)
    history = [{"global_step": 10 * i, "score_mean": float(i), "kl": 0.1 * i, "kl_coef": 0.2} for i in range(5)]
    rec = write_report(tmp_path, before, after, history=history, config={"x": 1}, extra={"timing": {"total_s": 1.5}})
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["before"]["positive_rate_judge"] == 1.0 and data["after"]["positive_rate_judge"] == 0.0
    assert len(data["samples"]) == 16 and data == json.loads(json.dumps(rec, default=str))
    assert data["gain"]["reward_mean"] == pytest.approx(after[0]["reward_mean"] - before[0]["reward_mean"])
    md = (tmp_path / "report.md").read_text()
    assert "positive rate (held-out judge)" in md and "training.png" in md and "| timing.total_s | 1.500 |" in md
    assert (tmp_path / "training.png").stat().st_size > 1000
    table = report_table(rec)
    assert table in md and table.startswith("| metric | before | after |")
    assert "| positive rate (held-out judge) | 1.000 | 0.000 |" in table.splitlines()
    with pytest.raises(ValueError, match="different prompts"):
        write_report(tmp_path, before, evaluate(model, model, tok, PROMPTS[:3], reward_fn=count_a,
                                                max_new_tokens=2)[:2])


def test_plot_leaves_the_matplotlib_backend_alone(tmp_path):
    # a Jupyter session's backend (here: svg) must survive the report; the old matplotlib.use("Agg") switched it
    code = ("import sys, matplotlib; from pathlib import Path; from agents.rlhf.report import plot_history; "
            f"p = plot_history([{{'global_step': 1, 'score_mean': 0.5, 'kl': 0.1}}], Path({str(tmp_path)!r}) / 'p.png'); "
            "print(matplotlib.rcParams['backend'], 'matplotlib.pyplot' in sys.modules, p.stat().st_size)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MPLBACKEND": "svg"})
    assert out.returncode == 0, out.stderr
    backend, pyplot, size = out.stdout.split()
    assert backend == "svg" and pyplot == "False" and int(size) > 500, out.stdout
