"""The RLHF main job: a short run learns a toy reward; bad input fails before training; the CLI works."""

import dataclasses
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.cli import UsageError
from agents.rlhf import Pieces, RLHFConfig, embedded, imdb, parse_args, prepare, run, smollm2
from agents.rlhf.baselines import best_of_n, pick_best
from agents.rlhf.config import EMBEDDED_ITERATIONS, check_config, rlhf_ppo
from textenv import EpisodeSpec, KeywordReward, char_tokenizer
from tiny import PROMPTS, tiny_classifier, tiny_gpt, toy_config, without_clocks


@pytest.mark.slow
def test_short_rlhf_run_learns_a_keyword_reward(tmp_path):
    tok = char_tokenizer("ab ")
    pieces = Pieces(tokenizer=tok, policy=tiny_gpt(len(tok)), reward_fn=KeywordReward("a"), train_prompts=PROMPTS,
                    eval_prompts=PROMPTS * 8)
    rec = run(toy_config(tmp_path), pieces)
    before, after = rec["before"], rec["after"]
    # A random 6-token policy writes ~1.3 "a" per 8 tokens (sd ~1.1, so the mean of 48 has sd ~0.16);
    # a gain of 2 is > 10 standard errors: not chance.
    assert after["reward_mean"] - before["reward_mean"] > 2.0, (before, after)
    assert before["kl_mean"] == 0.0 and after["kl_mean"] > 0.0
    assert len(rec["history"]) == 10 and rec["history"][-1]["score_mean"] > rec["history"][0]["score_mean"]
    for name in ("report.md", "report.json", "training.png", "policy/config.json", "checkpoint.pt"):
        assert (tmp_path / "run" / name).exists(), name


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def folders(tmp_path):
    """A saved tiny policy (+ char tokenizer), a tiny classifier reward model, and a small data folder."""
    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz .")
    policy = tmp_path / "policy"
    tiny_gpt(len(tok), positions=32).save_pretrained(policy)
    tok.save_pretrained(policy)
    rm = tmp_path / "rm"
    tiny_classifier(len(tok)).save_pretrained(rm)
    tok.save_pretrained(rm)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        with gzip.open(data / f"{split}.jsonl.gz", "wt") as f:
            for i in range(20):
                f.write(json.dumps({"text": f"a good film number {i}. loved it", "label": i % 2}) + "\n")
    return {"policy": str(policy), "rm": str(rm), "data": str(data), "tok": tok, "tmp": tmp_path}


def given(folders, max_new_tokens: int = 8, **kw) -> RLHFConfig:
    base = dict(policy=folders["policy"], reward_model=folders["rm"], judge="none", data_dir=folders["data"],
                episode=EpisodeSpec(max_prompt_tokens=8, max_new_tokens=max_new_tokens, query_tokens=(2, 8)),
                eval_prompts=8)
    return RLHFConfig(**base | kw, ppo=rlhf_ppo(run_dir=str(folders["tmp"] / "run")))


def test_given_folders_prepare_without_building(folders):
    pieces = prepare(given(folders), torch.device("cpu"))
    assert len(pieces.eval_prompts) == 8 and all(1 <= len(p) <= 8 for p in pieces.eval_prompts)
    scores = pieces.reward_fn(["a good film", "bad"])
    probs = pieces.reward_positive_fn(["a good film", "bad"])
    assert len(scores) == 2 and all(0.0 <= p <= 1.0 for p in probs)


def test_policy_vocabulary_smaller_than_tokenizer(folders):
    small = folders["tmp"] / "small"
    tiny_gpt(8, positions=32).save_pretrained(small)
    with pytest.raises(ValueError, match="vocabulary of 8 tokens, smaller than its tokenizer's"):
        prepare(given(folders, policy=str(small), tokenizer=folders["policy"]), torch.device("cpu"))
    tok = char_tokenizer("ab")
    with pytest.raises(ValueError, match="smaller than its tokenizer"):
        run(toy_config(folders["tmp"]), Pieces(tok, tiny_gpt(3), KeywordReward("a"), PROMPTS, PROMPTS))
    assert not (folders["tmp"] / "run").exists()  # nothing trained, nothing written


def test_tokenizer_without_eos(folders):
    tok = char_tokenizer("ab")
    tok.eos_token = None
    assert tok.eos_token_id is None
    with pytest.raises(ValueError, match="no EOS token"):
        run(toy_config(folders["tmp"]), Pieces(tok, tiny_gpt(len(tok)), KeywordReward("a"), PROMPTS, PROMPTS))


def test_model_folders_of_the_wrong_kind(folders):
    with pytest.raises(ValueError, match="not a sequence classifier"):
        prepare(given(folders, reward_model=folders["policy"]), torch.device("cpu"))
    empty = folders["tmp"] / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        prepare(given(folders, reward_model=str(empty)), torch.device("cpu"))
    with pytest.raises(UsageError, match="not a causal LM"):
        prepare(given(folders, policy=folders["rm"]), torch.device("cpu"))


def test_data_dir_without_usable_text(folders):
    blank = folders["tmp"] / "blank"
    blank.mkdir()
    for split in ("train", "test"):
        (blank / f"{split}.jsonl").write_text(json.dumps({"text": "   ", "label": 1}) + "\n")
    with pytest.raises(ValueError, match="no usable text"):
        prepare(given(folders, data_dir=str(blank)), torch.device("cpu"))
    with pytest.raises(ValueError, match="does not exist"):
        prepare(given(folders, data_dir=str(folders["tmp"] / "nowhere")), torch.device("cpu"))


def test_response_longer_than_the_context(folders):
    with pytest.raises(ValueError, match="do not fit the context"):
        prepare(given(folders, max_new_tokens=30), torch.device("cpu"))  # 8 + 30 > 32 positions


def test_presets_keep_the_jobs_ppo_settings():
    # the job's PPO settings, nested in `ppo` (the PID KL controller holding each preset's setpoint)
    job = dict(exp_name="rlhf", env_id="TextEnv-v0", seed=1, num_envs=64, anneal_lr=True,
               update_epochs=4, num_minibatches=4, gamma=1.0, gae_lambda=0.95, clip_coef=0.2, clip_vloss=True,
               vf_coef=0.1, ent_coef=0.0, max_grad_norm=1.0, kl_coef=0.2, kl_horizon=1000,
               minibatch_by_env=True,
               bootstrap_truncated=False, eval_episodes=0, log_every=0, save_every=50, run_dir=None, resume=False)
    for cfg, steps, lr, kl_target, advantages in ((embedded(), EMBEDDED_ITERATIONS * 64 * 16, 5e-5, 1.5, "rloo"),
                                                  (imdb(), 100 * 64 * 34, 1e-4, 5.0, "gae")):
        got = dataclasses.asdict(cfg.ppo)
        assert {k: got[k] for k in job} == job
        assert (cfg.ppo.total_timesteps, cfg.ppo.learning_rate, cfg.ppo.kl_target, cfg.ppo.kl_controller,
                cfg.ppo.advantages) == (steps, lr, kl_target, "pid", advantages)
    # the embedded preset collects whole episodes, 4 per prompt, one per env column: 16 steps cover 16 new tokens
    assert (embedded().group_size, embedded().normalize_reward, embedded().ppo.num_steps) == (4, True, 16)
    assert (embedded().models, imdb().models, imdb().data_dir) == ("embedded", "imdb", "../shared/data/imdb")
    assert (imdb().group_size, imdb().ppo.num_steps) == (1, 34)
    # the presets built from the data sample their LM's own distribution; the real LM's tail is trimmed
    assert embedded().temperature == imdb().temperature == 1.0 and smollm2().temperature == 0.7
    assert (smollm2().ppo.learning_rate, smollm2().ppo.kl_coef, smollm2().ppo.kl_target) == (1e-4, 0.1, 5.0)
    assert smollm2().no_repeat_ngram == 3 and embedded().no_repeat_ngram == imdb().no_repeat_ngram == 0
    assert smollm2().no_repeat_word == 4 and embedded().no_repeat_word == imdb().no_repeat_word == 0


def test_cli_help_and_presets(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "--data-dir" in out and "--reward-model" in out and "--ppo.learning-rate" in out
    assert parse_args([]) == embedded()
    assert parse_args(["imdb"]) == imdb()
    tuned = parse_args(["embedded", "--ppo.learning-rate", "1e-4", "--max-new-tokens", "12"])
    assert (tuned.models, tuned.ppo.learning_rate, tuned.episode.max_new_tokens) == ("embedded", 1e-4, 12)
    assert tuned.episode.query_tokens == (2, 8) and parse_args(["--query-tokens", "None"]).episode.query_tokens is None
    seeded = parse_args(["--ppo.seed", "2"])  # no preset named: the default one
    assert (seeded.models, seeded.ppo.seed, seeded.ppo.num_envs) == ("embedded", 2, 64)
    assert parse_args(["imdb", "--ppo.seed", "3"]).ppo.learning_rate == 1e-4  # the preset's, under a flag


@pytest.mark.parametrize("argv, message", [
    (["--ppo.num-envs", "4", "--ppo.num-minibatches", "3"], "num_minibatches"),
    (["--data-dir", "/nonexistent", "--quick"], "/nonexistent"),
    (["--quick", "--artifacts-dir", "{tmp}/a_file/cache"], "cannot write the artefact cache {tmp}/a_file/cache/"),
    (["--quick", "--ppo.run-dir", "{tmp}/a_file/run"], "cannot write the run folder {tmp}/a_file/run: {tmp}/a_file is"),
    (["--quick", "--repeated-words-penalty", "-1"], "--repeated-words-penalty -1.0 must be >= 0"),
])
def test_cli_user_errors_print_one_line(tmp_path, argv, message, monkeypatch, capsys):
    # `python -m agents.rlhf ...` in this process, through its `main` (the slow set runs the real command)
    from agents.rlhf.job import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")  # a folder under a file cannot be made, even by root
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    monkeypatch.setattr(sys, "argv", ["agents.rlhf", "--artifacts-dir", str(tmp_path), *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exit_.value.code == 2 and len(errors) == 1 and message.replace("{tmp}", str(tmp_path)) in errors[0], err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


@pytest.mark.slow  # a torchrun launch
def test_torchrun_two_ranks_train_together_and_only_rank_0_reports(folders, torchrun):
    tmp = folders["tmp"]
    # 2 ranks x 4 envs x 9 steps = 72 tokens per iteration; 3 iterations
    run = torchrun("-m", "agents.rlhf", "--policy", folders["policy"], "--reward-model", folders["rm"],
                   "--judge", "none", "--data-dir", folders["data"], "--ppo.run-dir", "run", "--max-prompt-tokens", "8",
                   "--max-new-tokens", "8", "--ppo.num-envs", "4", "--ppo.num-steps", "9", "--ppo.total-timesteps",
                   "216", "--ppo.num-minibatches", "2", "--ppo.update-epochs", "1", "--eval-prompts", "8",
                   "--ppo.torch-threads", "1", "--ppo.save-every", "0", "--ppo.device", "cpu", cwd=tmp, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("before:") == 1 and run.stdout.count("after:") == 1, run.stdout[-2000:]
    assert "iter    3/3" in run.stdout, run.stdout[-2000:]  # 216 tokens / (4 envs x 9 steps x 2 ranks)
    rec = json.loads((tmp / "run" / "report.json").read_text())
    assert rec["timing"]["ppo_tokens"] == 216 and len(rec["history"]) == 3
    assert sorted(p.name for p in tmp.iterdir() if p.name not in ("policy", "rm", "data")) == ["run"]
    assert not (tmp / "runs").exists()


def test_run_returns_the_run_dir_it_chose(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run_dir is relative: runs/rlhf-...
    tok = char_tokenizer("ab ")
    pieces = Pieces(tokenizer=tok, policy=tiny_gpt(len(tok)), reward_fn=KeywordReward("a"), train_prompts=PROMPTS,
                    eval_prompts=PROMPTS)
    rec = run(toy_config(tmp_path, ppo=dict(run_dir=None, num_envs=4, total_timesteps=4 * 18, save_every=0)), pieces)
    run_dir = tmp_path / rec["run_dir"]
    assert rec["run_dir"].startswith("runs/rlhf-embedded-1-") and (run_dir / "report.md").is_file()
    assert json.loads((run_dir / "report.json").read_text())["run_dir"] == rec["run_dir"]


def test_held_out_prompts_are_cut_like_the_env_cuts_its_queries():
    from agents.rlhf import cut_queries
    from textenv.env import TextEnv

    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz .")
    text = "a good film. " * 20  # longer than the env's encoded head (16 x hi characters)
    queries = cut_queries(tok, [text] * 60 + ["   "], 2, 5, seed=0)
    env = TextEnv(tok, lambda t: [0.0] * len(t), [text], max_prompt_tokens=5, max_new_tokens=1, query_tokens=(2, 5))
    drawn = {env.reset(seed=s)[1]["prompt"] for s in range(60)}
    assert len(queries) == 60 and set(queries) == drawn == {text[:n] for n in range(2, 6)}


def test_logger_reports_the_mean_of_ppos_per_episode_kl_sums():
    from agents.rlhf.logger import RLHFLogger
    from agents.rollout import Episode, Rollout

    tok = char_tokenizer("ab ")
    logp = torch.full((4, 2), -1.0)
    zeros = torch.zeros(4, 2)
    # episodes of 1 and 3 tokens: the old estimate (per-token mean x mean length) would give 2 x 0.5 = 1.0
    episodes = [Episode(4, 1.0, 1, 0.1, {"score": 1.0, "completion": "a", "length": 2, "prompt_length": 1}),
                Episode(8, 0.0, 3, 3.0, {"score": 0.0, "completion": "ab ", "length": 4, "prompt_length": 1})]
    rollout = Rollout(obs=zeros, actions=zeros.long(), logprobs=logp, values=zeros, rewards=zeros,
                      ref_logprobs=logp - 0.5, valid=torch.ones(4, 2, dtype=torch.bool),
                      terminated=zeros.bool(), truncated=zeros.bool(), next_obs=zeros[0], episodes=episodes)
    logger = RLHFLogger(tok, total_iterations=1, print_every=0)
    stats = logger.on_iteration(1, 8, rollout, kl_coef=0.2)
    assert stats["rlhf/kl"] == pytest.approx(1.55) and stats["rlhf/kl_per_token"] == pytest.approx(0.5)
    assert logger.history[0]["kl"] == pytest.approx(1.55)
    no_ref = dataclasses.replace(rollout, ref_logprobs=None,  # no reference model: no KL per response
                                 episodes=[dataclasses.replace(e, kl=None) for e in episodes])
    assert "rlhf/kl" not in logger.on_iteration(2, 16, no_ref)


def test_the_logger_checkpoints_the_stale_phrase_window_and_refuses_another_size():
    from agents.cli import UsageError
    from agents.rlhf.logger import RLHFLogger
    from textenv.rewards import StalePhrasePenalty

    tok = char_tokenizer("ab ")
    logger = RLHFLogger(tok, total_iterations=1, print_every=0)
    assert "reward" not in logger.state_dict()  # no reward with a memory: the checkpoint as before
    logger.reward_state = StalePhrasePenalty(KeywordReward("a"), 1.0, window=4)
    logger.reward_state(["a b c"])
    state = logger.state_dict()
    resumed = RLHFLogger(tok, total_iterations=1, print_every=0)
    resumed.reward_state = StalePhrasePenalty(KeywordReward("a"), 1.0, window=4)
    resumed.load_state_dict(state)
    assert resumed.reward_state(["a b d"]) == [1.0 - 0.5]  # (a b) seen before the checkpoint, (b d) not
    other = RLHFLogger(tok, total_iterations=1, print_every=0)
    other.reward_state = StalePhrasePenalty(KeywordReward("a"), 1.0, window=8)
    with pytest.raises(UsageError, match="window holds 4 texts, this run's 8; resume with --stale-phrase-window 4"):
        other.load_state_dict(state)


def test_same_seed_same_run_whatever_ran_before(tmp_path):
    # Two runs of one seed must not depend on the global RNG state the caller left (a build, a model load):
    # the value head used to be initialised from it, and the runs parted after their first update.
    tok = char_tokenizer("ab ")
    records = []
    for disturb in (0, 1):
        pieces = Pieces(tokenizer=tok, policy=tiny_gpt(len(tok)), reward_fn=KeywordReward("a"),
                        train_prompts=PROMPTS, eval_prompts=PROMPTS * 2)
        torch.manual_seed(disturb)  # what ran before this run
        rec = run(toy_config(tmp_path / str(disturb), ppo=dict(total_timesteps=16 * 18 * 3, save_every=0)), pieces)
        records.append({k: (rec[k]["reward_mean"], rec[k]["kl_mean"], rec[k]["ref_perplexity"])
                        for k in ("before", "after")} | {"history": rec["history"][-1]["score_mean"]})
    assert records[0] == records[1]


@pytest.mark.slow  # builds the embedded models into ./artifacts once (cached), then two --quick runs of the main job
def test_the_main_job_run_twice_with_one_seed_gives_one_report(tmp_path):
    # as a user runs it: two processes, each with its own string hash seed (the judge's sums used to follow it)
    root = Path(__file__).resolve().parents[1]
    reports = []
    for name, hash_seed in (("a", "1"), ("b", "2")):
        cmd = [sys.executable, "-m", "agents.rlhf", "embedded", "--quick", "--ppo.seed", "3", "--ppo.torch-threads",
               "1", "--ppo.run-dir", str(tmp_path / name), "--artifacts-dir", str(root / "artifacts")]
        subprocess.run(cmd, cwd=root, check=True, capture_output=True, timeout=1200,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed})
        reports.append(json.loads((tmp_path / name / "report.json").read_text()))
    a, b = ({k: r[k] for k in ("before", "after", "samples")} | {"history": without_clocks(r["history"])}
            for r in reports)
    assert a["after"]["kl_mean"] != 0 and a == b


def test_group_relative_run_with_normalised_reward_and_a_best_of_n_baseline(tmp_path):
    tok = char_tokenizer("ab ")
    pieces = Pieces(tokenizer=tok, policy=tiny_gpt(len(tok)), reward_fn=KeywordReward("a"), train_prompts=PROMPTS,
                    eval_prompts=PROMPTS * 2)
    cfg = toy_config(tmp_path, ppo=dict(advantages="rloo", num_steps=8, total_timesteps=16 * 8 * 4),
                     group_size=4, normalize_reward=True, best_of_n=(1, 2, 4), best_of_n_prompts=6)
    rec = run(cfg, pieces)
    rows = rec["best_of_n"]["rows"]
    assert [r["n"] for r in rows] == [1, 2, 4] and rows[0]["kl_bound"] == 0.0
    # the first n samples are nested: the reward model's favourite of more can only score as well or better
    assert rows[0]["reward_mean"] <= rows[1]["reward_mean"] <= rows[2]["reward_mean"]
    assert rows[2]["reward_mean"] > rows[0]["reward_mean"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| best-of-4 | <= 0.64 |" in md and "| tuned policy |" in md  # log 4 - 3/4
    # PPO saw the normalised score: its episodes' scores are centred on the initial policy's mean (a raw count of
    # "a" is never negative), while the report keeps the raw score
    assert min(h["score_mean"] for h in rec["history"]) < 0 < rec["before"]["reward_mean"]
    assert len(rec["history"]) == 4


def run_from_the_reference(cfg: RLHFConfig, pieces: Pieces) -> dict:
    """`run`, checking that the rollout and the KL reference describe one distribution at the start: no PPO ratio
    warning, and a KL of 0 in the first iteration and in the report's "before"."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = run(cfg, pieces)
    assert not [w for w in caught if "ratio" in str(w.message)]
    assert abs(rec["history"][0]["kl"]) < 1e-5 and rec["before"]["kl_mean"] == pytest.approx(0.0, abs=1e-5)
    return rec


def test_the_jobs_temperature_reaches_the_policy_the_reference_and_the_report(tmp_path):
    """At T = 0.5 the first rollout's policy equals its reference (KL 0: both score at T), the first PPO ratio is 1,
    and the report and the saved policy say T."""
    tok = char_tokenizer("ab ")
    pieces = Pieces(tokenizer=tok, policy=tiny_gpt(len(tok)), reward_fn=KeywordReward("a"), train_prompts=PROMPTS,
                    eval_prompts=PROMPTS * 2)
    cfg = toy_config(tmp_path, ppo=dict(advantages="rloo", num_steps=8, total_timesteps=16 * 8 * 2, kl_coef=0.2),
                     group_size=4, temperature=0.5, best_of_n_prompts=0)
    rec = run_from_the_reference(cfg, pieces)
    assert rec["history"][1]["kl"] != 0.0  # after an update the policy moved away from the reference
    assert "sampled at temperature 0.5" in (tmp_path / "run" / "report.md").read_text()
    saved = json.loads((tmp_path / "run" / "policy" / "generation_config.json").read_text())
    assert saved["temperature"] == 0.5 and saved["do_sample"] is True
    with pytest.raises(UsageError, match="--temperature 0"):
        check_config(dataclasses.replace(cfg, temperature=0.0))


def test_no_repeat_ngram_masks_the_rollout_the_reference_the_report_and_the_saved_policy(tmp_path):
    """--no-repeat-ngram 2: the training envs and the report's (best-of-n's too) carry the mask, so no text holds a
    pair of tokens twice; the reference scores over the same allowed tokens (the first rollout's KL is 0 and PPO's
    first ratio 1), and the saved policy's `generate` bans the same n-grams."""
    from agents.rlhf.job import action_mask, held_out, make_training_envs
    from agents.rlhf.report import sample_episodes

    tok = char_tokenizer("ab ")
    pieces = Pieces(tokenizer=tok, policy=tiny_gpt(len(tok)), reward_fn=KeywordReward("a"), train_prompts=PROMPTS,
                    eval_prompts=PROMPTS * 2)
    cfg = toy_config(tmp_path, ppo=dict(advantages="rloo", num_steps=8, total_timesteps=16 * 8 * 2, kl_coef=0.2),
                     group_size=4, no_repeat_ngram=2, best_of_n=(1, 2), best_of_n_prompts=4)

    def repeats(s) -> int:  # texts (as token ids, prompt and response) that hold a pair of tokens twice
        ids = [[*p, *r] for p, r in zip(s.prompt_ids, s.response_ids, strict=True)]
        return sum(len(set(zip(t, t[1:], strict=False))) < len(t) - 1 for t in ids)

    masked = sample_episodes(pieces.policy, pieces.policy, held_out(cfg, pieces))
    unmasked = sample_episodes(pieces.policy, pieces.policy, held_out(dataclasses.replace(cfg, no_repeat_ngram=0),
                                                                      pieces))
    assert repeats(masked) == 0 and repeats(unmasked) > 2  # the same seed: the mask, not chance, kept them out
    envs = make_training_envs(cfg, pieces, pieces.reward_fn, pieces.policy, torch.device("cpu"))
    assert envs.unwrapped.get_attr("action_mask")[0].n == 2  # and the env refuses a masked action, so PPO sampled within it
    envs.close()
    run_from_the_reference(cfg, pieces)
    saved = json.loads((tmp_path / "run" / "policy" / "generation_config.json").read_text())
    assert saved["no_repeat_ngram_size"] == 2
    assert action_mask(dataclasses.replace(cfg, no_repeat_ngram=0), tok) is None
    with pytest.raises(UsageError, match="--no-repeat-ngram -1 must be >= 0"):
        check_config(dataclasses.replace(cfg, no_repeat_ngram=-1))


def word_tokenizer():
    """A byte-level word tokenizer over a few film words: a random policy says the same word twice often."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from textenv.build.bpe import CLS, EOS, PAD, wrap

    words = ["Ġgreat", "ĠGreat", "Ġmovie", "Ġfilm", "Ġacting", "Ġis", "Ġa", "Ġit", "."]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate([EOS, PAD, CLS, "[UNK]", *words])}, unk_token="[UNK]"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=True), decoders.ByteLevel()
    return wrap(raw)


def test_no_repeat_word_masks_the_rollout_the_reference_and_the_report_beside_the_ngram_mask(tmp_path):
    """--no-repeat-word 4 with --no-repeat-ngram 2: no held-out response says a word of 4+ letters twice (the same
    seed without it does), both masks hold at once, the reference scores over what they allow (the first KL is 0,
    PPO's first ratio 1), and a negative value is refused."""
    from agents.rlhf.job import action_mask, held_out
    from agents.rlhf.report import sample_episodes
    from textenv.masks import AllMasks

    tok = word_tokenizer()
    prompts = ["a great movie", "it is a film", "great acting", "a film is"]
    pieces = Pieces(tokenizer=tok, policy=tiny_gpt(len(tok)), reward_fn=KeywordReward("great"),
                    train_prompts=prompts, eval_prompts=prompts * 8)
    cfg = toy_config(tmp_path, ppo=dict(advantages="rloo", num_steps=8, total_timesteps=16 * 8 * 2, kl_coef=0.2),
                     group_size=4, no_repeat_word=4, no_repeat_ngram=2, best_of_n=(1, 2), best_of_n_prompts=4,
                     episode=EpisodeSpec(max_prompt_tokens=4, max_new_tokens=8, min_new_tokens=8))

    def repeats(s) -> tuple[int, int]:  # responses that say a word of 4+ letters twice, texts with a pair twice
        words = [[w.lower() for w in tok.decode(r).split() if len(w) >= 4] for r in s.response_ids]
        ids = [[*p, *r] for p, r in zip(s.prompt_ids, s.response_ids, strict=True)]
        grams = [list(zip(t, t[1:], strict=False)) for t in ids]
        return sum(len(set(w)) < len(w) for w in words), sum(len(set(g)) < len(g) for g in grams)

    assert isinstance(action_mask(cfg, tok), AllMasks)
    masked = sample_episodes(pieces.policy, pieces.policy, held_out(cfg, pieces))
    plain = sample_episodes(pieces.policy, pieces.policy,
                            held_out(dataclasses.replace(cfg, no_repeat_word=0, no_repeat_ngram=0), pieces))
    assert repeats(masked) == (0, 0) and min(repeats(plain)) > 2  # the same seed: the masks kept them out
    run_from_the_reference(cfg, pieces)
    report = (tmp_path / "run" / "report.md").read_text()  # the report says how its texts were sampled
    assert "no 2 tokens in a row twice in a text, no word of 4+ letters twice in a response" in report
    with pytest.raises(UsageError, match="--no-repeat-word -1 must be >= 0"):
        check_config(dataclasses.replace(cfg, no_repeat_word=-1))


def test_the_repeated_words_and_stale_phrase_penalties_come_after_normalising():
    """PPO trains on (score - mean) / std - coef x share of repeated words (or of stale word pairs)."""
    from agents import distributed
    from agents.rlhf.job import training_reward

    tok = char_tokenizer("ab ")
    pieces = Pieces(tokenizer=tok, policy=None, reward_fn=KeywordReward("a"), train_prompts=PROMPTS,
                    eval_prompts=PROMPTS)
    before = ({"reward_mean": 2.0, "reward_std": 4.0},)
    texts = ["abba abba", "abba aabb"]  # 4 and 4 "a"s: normalised (4 - 2) / 4 = 0.5; repeated words 1/2 and 0
    cfg = RLHFConfig(normalize_reward=True, repeated_words_penalty=3.0)
    assert training_reward(cfg, pieces, before, distributed.given(None))(texts) == pytest.approx([0.5 - 1.5, 0.5])
    plain = dataclasses.replace(cfg, repeated_words_penalty=0.0)
    assert training_reward(plain, pieces, before, distributed.given(None))(texts) == pytest.approx([0.5, 0.5])
    # the stale-phrase term comes after normalising too, and remembers the texts of earlier calls
    stale = training_reward(dataclasses.replace(plain, stale_phrase_penalty=2.0), pieces, before,
                            distributed.given(None))
    assert stale(texts) == pytest.approx([0.5, 0.5])  # nothing scored before
    assert stale(["abba abba"]) == pytest.approx([0.5 - 2.0])  # its one pair, (abba abba), was used


def test_reward_output_prob_pays_p_positive_standardised_by_the_starts():
    """--reward-output prob: PPO trains on (P(positive) - mean) / std of the initial policy's P(positive); pieces
    with no P(positive) are a one-line usage error."""
    from agents import distributed
    from agents.rlhf.job import training_reward
    from agents.rlhf.pieces import check_pieces

    tok = char_tokenizer("ab ")
    pieces = Pieces(tokenizer=tok, policy=None, reward_fn=KeywordReward("a"), train_prompts=PROMPTS,
                    eval_prompts=PROMPTS, reward_positive_fn=KeywordReward("b", weight=0.1))
    before = ({"reward_mean": 2.0, "reward_std": 4.0, "reward_prob_mean": 0.2, "reward_prob_std": 0.5},)
    texts = ["abbb", "aaab"]  # P(positive) stand-in 0.3 and 0.1; the logit stand-in 1 and 3
    cfg = RLHFConfig(normalize_reward=True, reward_output="prob")
    assert training_reward(cfg, pieces, before, distributed.given(None))(texts) == pytest.approx([0.2, -0.2])
    raw = dataclasses.replace(cfg, normalize_reward=False)
    assert training_reward(raw, pieces, before, distributed.given(None))(texts) == pytest.approx([0.3, 0.1])
    logit = dataclasses.replace(cfg, reward_output="logit")
    assert training_reward(logit, pieces, before, distributed.given(None))(texts) == pytest.approx([-0.25, 0.25])
    with pytest.raises(UsageError, match="--reward-output prob .* no reward_positive_fn"):  # before any model runs
        check_pieces(dataclasses.replace(pieces, reward_positive_fn=None), cfg)


def test_best_of_n_keeps_the_reward_models_favourite_of_the_first_n():
    scores = np.array([[0.1, 0.9, 0.5, 2.0], [1.0, -1.0, 3.0, 0.0]])
    judged = np.array([[0.9, 0.2, 0.8, 0.7], [0.1, 0.9, 0.6, 0.4]])  # the judge disagrees with some picks
    rows = pick_best(scores, scores > 0.6, judged, (4, 1, 2))
    assert [r["n"] for r in rows] == [1, 2, 4]
    # n=1: samples 0, 0; n=2: 1, 0; n=4: 3, 2
    assert [r["reward_mean"] for r in rows] == pytest.approx([0.55, 0.95, 2.5])
    assert [r["positive_rate_reward_model"] for r in rows] == [0.5, 1.0, 1.0]
    assert [r["positive_rate_judge"] for r in rows] == [0.5, 0.0, 1.0]
    assert rows[2]["kl_bound"] == pytest.approx(np.log(4) - 0.75)
    with pytest.raises(ValueError, match="every n >= 1; got \\(0, 4\\)"):
        best_of_n(None, None, None, ns=(0, 4))


@pytest.mark.parametrize("kw, message", [
    (dict(ppo=dict(advantages="rloo", num_steps=8)), "set --group-size >= 2"),
    (dict(ppo=dict(advantages="grpo", num_steps=4), group_size=4), "must be >= --max-new-tokens"),
    (dict(group_size=5), "must divide --ppo.num-envs 16"),
    (dict(warm_start=True), "needs --policy smollm2"),
    (dict(warm_start_layers=8), "--warm-start-layers 8 .* needs --warm-start"),
    (dict(best_of_n=(0, 4)), "--best-of-n .0, 4. must be >= 1"),
    (dict(repeated_words_penalty=-1.0), "--repeated-words-penalty -1.0 must be >= 0"),
    (dict(stale_phrase_penalty=-2.0), "--stale-phrase-penalty -2.0 must be >= 0"),
    (dict(stale_phrase_penalty=2.0, stale_phrase_window=0), "--stale-phrase-window 0 >= 1 text"),
])
def test_settings_of_group_advantages_and_warm_start_are_checked(tmp_path, kw, message):
    tok = char_tokenizer("ab ")
    pieces = Pieces(tokenizer=tok, policy=tiny_gpt(len(tok)), reward_fn=KeywordReward("a"), train_prompts=PROMPTS,
                    eval_prompts=PROMPTS)
    with pytest.raises(UsageError, match=message):
        run(toy_config(tmp_path, **kw), pieces)
    assert not (tmp_path / "run").exists()


def test_warm_start_layers_reach_the_build_step(monkeypatch):
    # the job asks `textenv.build` for the warm start of its preset, with only the tuned blocks changed
    import textenv.build.pipeline as pipeline
    from agents.rlhf.pieces import warm_start

    asked = []

    def build(args, step):
        asked.append((args.warm_start, step))
        raise RuntimeError("stop here")

    monkeypatch.setattr(pipeline, "build", build)
    for layers in (None, 12):
        with pytest.raises(RuntimeError, match="stop here"):
            warm_start(RLHFConfig(models="imdb", policy="smollm2", warm_start=True, warm_start_layers=layers))
    (default, step), (tuned, _) = asked
    assert step == "warmstart" and default == pipeline.preset("imdb").warm_start
    assert tuned == dataclasses.replace(default, trainable_layers=12)
