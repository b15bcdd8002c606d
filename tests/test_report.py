"""The RLHF report measures what it says, on cases small enough to check by hand."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from agents.gpt_policy import GPTAgent
from agents.rlhf.report import (
    HeldOut,
    evaluate_held_out,
    md_cell,
    report_table,
    sample_episodes,
    write_report,
)
from textenv import EpisodeSpec
from textenv.char_tokenizer import char_tokenizer
from textenv.env import TextEnv
from tiny import tiny_gpt

PROMPTS = ["ab", "ba a", "b", "aab", "bb b", "a"] * 4


pytestmark = pytest.mark.usefixtures("one_thread")  # 16-wide models: spinning threads make them ~30x slower


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer("ab ")  # ids: <pad> 0, <eos> 1, <unk> 2, a 3, b 4, ' ' 5


def tiny_lm(vocab: int, seed: int = 0, uniform: bool = False, scale: float = 1.0) -> GPT2LMHeadModel:
    model = tiny_gpt(vocab, seed=seed, positions=32).eval()
    with torch.no_grad():
        if uniform:  # tied embeddings: zero word embeddings -> zero logits -> uniform next-token distribution
            model.transformer.wte.weight.zero_()
        else:
            model.transformer.wte.weight.mul_(scale)
    return model


def count_a(texts):
    return [float(t.count("a")) for t in texts]


def held(tok, prompts, reward_fn=count_a, seed=0, batch_size=64, judge_fn=None, **episode) -> HeldOut:
    """The held-out set of `prompts` with an `EpisodeSpec(**episode)` (a wide prompt window by default)."""
    return HeldOut(tok, prompts, reward_fn, EpisodeSpec(**{"max_prompt_tokens": 64} | episode), judge_fn=judge_fn,
                   seed=seed, batch_size=batch_size)


def evaluate(policy, reference, tok, prompts, **kw):
    return evaluate_held_out(policy, reference, held(tok, prompts, **kw))


def sample(policy, reference, tok, prompts, **kw):
    return sample_episodes(policy, reference, held(tok, prompts, **kw))


def test_evaluates_every_prompt_once_in_order_and_kl_of_the_reference_is_zero(tok):
    model = tiny_lm(len(tok))
    for batch_size in (64, 5):  # 5: envs pick up the next prompt as soon as their episode ends
        m, s = evaluate(model, model, tok, PROMPTS, reward_fn=count_a, max_new_tokens=6, seed=3, batch_size=batch_size)
        assert m["n"] == len(s) == len(PROMPTS) and s.prompts == PROMPTS
        assert [tok.decode(p) for p in s.prompt_ids] == PROMPTS
        assert all(t == p + c for t, p, c in zip(s.texts, PROMPTS, s.completions, strict=True))
        assert m["kl_mean"] == 0.0 and all(np.array_equal(a, b) for a, b in zip(s.logprobs, s.ref_logprobs, strict=True))
        assert s.scores == count_a(s.texts) and m["reward_mean"] == pytest.approx(np.mean(count_a(s.texts)))
        assert m["reward_median"] == pytest.approx(np.median(count_a(s.texts)))
        assert m["mean_response_tokens"] == pytest.approx(np.mean([len(r) for r in s.response_ids]))


def test_reference_perplexity_of_a_uniform_model_is_the_vocabulary_size(tok):
    policy, uniform = tiny_lm(len(tok)), tiny_lm(len(tok), uniform=True)
    m, _ = evaluate(policy, uniform, tok, PROMPTS, reward_fn=count_a, max_new_tokens=5, seed=0)
    assert m["ref_perplexity"] == pytest.approx(len(tok), rel=1e-5)


def test_kl_is_sum_of_logprob_differences_and_positive(tok):
    # a sharp policy against a uniform reference: per token KL = log V - H(pi) > 0
    policy, uniform = tiny_lm(len(tok), seed=1, scale=20.0), tiny_lm(len(tok), uniform=True)
    m, s = evaluate(policy, uniform, tok, PROMPTS, reward_fn=count_a, max_new_tokens=6, seed=0, batch_size=7)
    # independent route: one unpadded teacher-forced forward per sample
    expected = []
    for p, r, lp_env in zip(s.prompt_ids, s.response_ids, s.logprobs, strict=True):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logits = policy(ids).logits
        lp = torch.log_softmax(logits[0, len(p) - 1 : -1].float(), -1)
        lp = lp.gather(1, torch.tensor(r)[:, None]).squeeze(1)
        np.testing.assert_allclose(lp_env, lp.numpy(), rtol=1e-4, atol=1e-5)  # the agent's per-token log pi
        expected.append(float(lp.sum()) + len(r) * math.log(len(tok)))
    assert all(np.allclose(b, -math.log(len(tok))) for b in s.ref_logprobs)
    assert m["kl_mean"] == pytest.approx(np.mean(expected), rel=1e-4, abs=1e-4)
    assert m["kl_mean"] > 0.5


def eos_happy_lm(tok) -> GPT2LMHeadModel:
    model = tiny_lm(len(tok), seed=2)
    head = torch.nn.Linear(16, len(tok))  # untied head with a large EOS bias: EOS is very likely everywhere
    with torch.no_grad():
        head.bias[tok.eos_token_id] = 6.0
    model.lm_head = head
    return model


def test_episodes_are_the_envs_and_sampling_is_seeded(tok):
    model = eos_happy_lm(tok)
    kw = dict(reward_fn=count_a, max_new_tokens=6, min_new_tokens=3, max_prompt_tokens=8, batch_size=4)
    rng_state = torch.get_rng_state()
    a = sample(model, model, tok, PROMPTS, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is left as it was
    b = sample(model, model, tok, PROMPTS, seed=7, **kw)
    assert a.response_ids == b.response_ids and a.texts == b.texts and a.scores == b.scores
    assert a.response_ids != sample(model, model, tok, PROMPTS, seed=8, **kw).response_ids
    agent = GPTAgent(model, tok.pad_token_id, len(tok))
    assert sample(agent, model, tok, PROMPTS, seed=7, **kw).response_ids == a.response_ids  # an agent as is
    # the report's episode IS the env's: replaying its tokens in a TextEnv ends it on the same token, same score
    env = TextEnv(tok, count_a, PROMPTS, max_prompt_tokens=8, max_new_tokens=6, min_new_tokens=3)
    for k, r in enumerate(a.response_ids):
        env.reset(seed=7 + k, options={"prompt_index": k})
        ends = [env.step(t)[2:] for t in r]
        assert [term or trunc for term, trunc, _ in ends] == [False] * (len(r) - 1) + [True]
        assert ends[-1][2]["score"] == a.scores[k] and ends[-1][2]["completion"] == a.completions[k]
    assert sum(len(r) == 4 for r in a.response_ids) > len(PROMPTS) // 2  # EOS right after the minimum
    assert sum(tok.eos_token_id in r[:3] for r in a.response_ids) > 0  # an early EOS is an ordinary token
    # (lo, hi) budgets: drawn per prompt from seed + k, so every policy gets the same ones
    kw = dict(reward_fn=count_a, max_new_tokens=(2, 4), min_new_tokens=4, seed=0, batch_size=3)
    budgets = [len(r) for r in sample(model, model, tok, PROMPTS * 2, **kw).response_ids]
    other = tiny_lm(len(tok), seed=5)
    assert budgets == [len(r) for r in sample(other, other, tok, PROMPTS * 2, **kw).response_ids]
    assert set(budgets) == {2, 3, 4}


def test_bad_evaluation_input(tok):
    model = tiny_lm(len(tok))
    with pytest.raises(ValueError, match="no prompts"):
        evaluate(model, model, tok, [], reward_fn=count_a, max_new_tokens=2)
    with pytest.raises(ValueError, match="longer than max_prompt_tokens"):
        evaluate(model, model, tok, ["ab" * 10], reward_fn=count_a, max_new_tokens=2, max_prompt_tokens=8)
    with pytest.raises(ValueError, match="one float per text"):
        evaluate(model, model, tok, PROMPTS, reward_fn=lambda t: [0.0], max_new_tokens=2)
    with pytest.raises(ValueError, match="tokenizer the agent was built with"):
        evaluate(GPTAgent(model, tok.pad_token_id, len(tok) - 1), model, tok, PROMPTS, reward_fn=count_a,
                 max_new_tokens=2)


def test_md_cell_keeps_a_table_row_one_row():
    assert md_cell("a|b\nc") == "a\\|b c"
    assert md_cell(1.5) == "1.5"


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
    assert len(data["samples"]) == len(PROMPTS) and data == json.loads(json.dumps(rec, default=str))  # all of them
    assert [x["prompt"] for x in data["samples"]] == PROMPTS and data["samples"][0]["judge_after"] == 0.1
    assert any("judge" in w for w in data["warnings"])  # judge 0% positive vs the reward model's rate
    assert data["gain"]["reward_mean"] == pytest.approx(after[0]["reward_mean"] - before[0]["reward_mean"])
    md = (tmp_path / "report.md").read_text()
    assert "## 16 sample pairs" in md and "## Over-optimisation warnings" in md  # Markdown: the first 16
    assert "positive rate (held-out judge)" in md and "training.png" in md and "| timing.total_s | 1.500 |" in md
    assert (tmp_path / "training.png").stat().st_size > 1000
    table = report_table(rec)
    assert table in md and table.startswith("| metric | before | after |")
    assert "| positive rate (held-out judge) | 1.000 | 0.000 |" in table.splitlines()
    with pytest.raises(ValueError, match="different prompts"):
        write_report(tmp_path, before, evaluate(model, model, tok, PROMPTS[:3], reward_fn=count_a,
                                                max_new_tokens=2)[:2])


def test_plot_leaves_the_matplotlib_backend_alone(tmp_path, monkeypatch):
    # a Jupyter session's backend must survive the report (the old matplotlib.use("Agg") switched it): the plot
    # draws on a bare Figure, so it works with pyplot unimportable and matplotlib.use refused
    import matplotlib

    from agents.rlhf.report import plot_history

    def use(*args, **kw):
        raise AssertionError(f"plot_history called matplotlib.use{args}")

    monkeypatch.setattr(matplotlib, "use", use)
    monkeypatch.delattr(matplotlib, "pyplot", raising=False)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # `import matplotlib.pyplot` raises ImportError
    backend = dict.__getitem__(matplotlib.rcParams, "backend")  # as set; reading rcParams["backend"] may resolve it
    p = plot_history([{"global_step": 1, "score_mean": 0.5, "kl": 0.1}], tmp_path / "p.png")
    assert p.stat().st_size > 500 and dict.__getitem__(matplotlib.rcParams, "backend") == backend


def test_perplexity_under_the_reference_is_the_reports_reference_perplexity(tok):
    from agents.rlhf.report import perplexity_under

    model = tiny_lm(len(tok), seed=4)
    m, s = evaluate(model, model, tok, PROMPTS, max_new_tokens=(2, 6), seed=1, batch_size=7)
    assert perplexity_under(model, s, tok, batch_size=5) == pytest.approx(m["ref_perplexity"], rel=1e-5)
    other = perplexity_under(tiny_lm(len(tok), seed=9, uniform=True), s, tok)
    assert other == pytest.approx(len(tok), rel=1e-5)  # a uniform model: perplexity = vocabulary size


def test_the_yardstick_scores_real_reviews_cut_to_the_episodes_lengths(tok, tmp_path):
    """Real texts are cut to each episode's prompt + response length and scored apart by label; the report shows
    them as a third column."""
    import dataclasses

    from agents.rlhf.yardstick import real_windows, yardstick
    from textenv.build.texts import Texts

    model = tiny_lm(len(tok))
    h = held(tok, PROMPTS[:6], reward_fn=count_a, judge_fn=lambda ts: [float("b" in t) for t in ts], max_new_tokens=4)
    m, s = evaluate_held_out(model, model, h)
    real = Texts(["a", "aaaa aaaa aaaa", "bbbb bbbb bbbb", "aaaa bbbb aaaa", "bbbb bbbb bbbb", "aaaa aaaa aaaa",
                  "bbbb aaaa bbbb", "aaaa aaaa aaaa"], [1, 1, 0, 1, 0, 1, 0, 1])
    w, labels = real_windows(tok, real, s)
    assert len(w) == 6 and labels == [1, 0, 1, 0, 1, 0]  # "a" is too short for any episode: skipped
    for i in range(6):
        assert (len(w.prompt_ids[i]), len(w.response_ids[i])) == (len(s.prompt_ids[i]), len(s.response_ids[i]))
    r = yardstick(dataclasses.replace(h, real=real), s)
    scores = np.array(count_a(w.texts))
    pos = np.array(labels) == 1
    assert r["n"] == 6 and r["positive_rate_reward_model"] == pytest.approx(float((scores > 0).mean()))
    assert r["positive_rate_reward_model_of_positive"] == pytest.approx(float((scores[pos] > 0).mean()))
    assert r["positive_rate_reward_model_of_negative"] == pytest.approx(float((scores[~pos] > 0).mean()))
    assert r["positive_rate_judge_of_negative"] == 1.0  # every negative text holds a "b"
    assert yardstick(h, s) == {}  # no real texts: no yardstick
    rec = write_report(tmp_path, (m, s), (m, s), extra={"real_reviews": r})
    table = report_table(rec)
    assert "| metric | before | after | real reviews, same lengths |" in table
    assert f"| positive rate (reward model) of real negative reviews | n/a | n/a | " \
           f"{r['positive_rate_reward_model_of_negative']:.3f} |" in table


def test_a_full_disk_while_the_report_is_written_leaves_no_half_file(tok, tmp_path, monkeypatch):
    """The real writer, failing half way through report.md (ENOSPC after some bytes): the previous report.md stays
    whole, no temporary file is left, and report.json and the plot are each whole."""
    import errno
    from pathlib import Path

    model = tiny_lm(len(tok))
    m, s = evaluate(model, model, tok, PROMPTS[:6], max_new_tokens=4)
    history = [{"global_step": 1, "score_mean": 0.1, "kl": 0.0}, {"global_step": 2, "score_mean": 0.2, "kl": 0.1}]
    write_report(tmp_path, (m, s), (m, s), history=history)
    old_md = (tmp_path / "report.md").read_text()
    real_write_text = Path.write_text

    def full_disk(self, data, *args, **kwargs):
        if self.name == "report.md.tmp":
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)  # half of it lands, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_report(tmp_path, (m, s), (m, s), history=history, config={"temperature": 0.5})
    assert (tmp_path / "report.md").read_text() == old_md  # the previous one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md", "training.png"]
    assert json.loads((tmp_path / "report.json").read_text())["config"] == {"temperature": 0.5}  # written whole
