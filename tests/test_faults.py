"""Faults inside a run of the RLHF job: the reward model, the reference model and the judge each raise, return
NaN, inf or the wrong number of scores, or hang. Every fault must stop the run with an error that names the
scorer and its batch, keep the last good checkpoint, and let `--ppo.resume` finish the run, once the fault is
fixed, with the numbers of a run that never failed (the group-relative runs start fresh episodes every iteration,
so nothing in flight is lost at a checkpoint). A killed process is tested in test_resume.py."""

import dataclasses
import re
import time
from pathlib import Path

import numpy as np
import pytest

from agents.checkpoint import load_checkpoint
from agents.rlhf import Pieces, run
from textenv import KeywordReward, char_tokenizer
from tiny import PROMPTS, tiny_gpt, toy_config, without_clocks

TOK = char_tokenizer("ab ")
ITERATIONS, SAVE_EVERY = 4, 2  # the fault strikes in iteration 3, after the checkpoint of iteration 2


def faulty(scorer, kind: str, armed):
    """`scorer` with a fault of `kind` on every call once `armed()` is true."""
    def call(texts):
        if not armed():
            return scorer(texts)
        if kind == "raise":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if kind == "slow":
            time.sleep(3)
            return scorer(texts)
        scores = list(scorer(texts))
        return scores[:-1] if kind == "count" else [float(kind)] + scores[1:]  # "nan", "inf"

    call.__name__ = getattr(scorer, "__name__", type(scorer).__name__)  # errors name the scorer
    return call


def judge(texts):
    return [min(1.0, t.count("a") / 4) for t in texts]


def config(run_dir: Path, resume: bool = False):
    ppo = dict(run_dir=str(run_dir), advantages="rloo", num_steps=8, total_timesteps=16 * 8 * ITERATIONS,
               save_every=SAVE_EVERY, resume=resume)
    return toy_config(run_dir, ppo=ppo, group_size=4, best_of_n_prompts=0, eval_prompts=12, reward_timeout=1.0)


def pieces(reward=None, judge_fn=judge) -> Pieces:
    return Pieces(tokenizer=TOK, policy=tiny_gpt(len(TOK)), reward_fn=reward or KeywordReward("a"),
                  train_prompts=PROMPTS, eval_prompts=PROMPTS * 2, judge_fn=judge_fn)


def numbers(rec: dict) -> dict:
    """What two runs of one seed must share: the before/after measures and the history without its clocks."""
    return {"before": rec["before"], "after": rec["after"], "history": without_clocks(rec["history"])}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return numbers(run(config(tmp_path_factory.mktemp("clean") / "run"), pieces()))


def stops_then_resumes(run_dir: Path, broken: Pieces, error: type, match: str, clean: dict) -> list[str]:
    """Run with `broken` pieces: the error, the checkpoint of iteration 2 kept; then resume with healthy pieces
    and get the clean run's numbers. Returns the error's notes."""
    with pytest.raises(error, match=match) as e:
        run(config(run_dir), broken)
    notes = getattr(e.value, "__notes__", [])
    assert any(f"last good checkpoint, {run_dir / 'checkpoint.pt'} (iteration {SAVE_EVERY})" in n for n in notes)
    assert load_checkpoint(run_dir / "checkpoint.pt")["iteration"] == SAVE_EVERY
    assert not (run_dir / "checkpoint.pt.tmp").exists() and not (run_dir / "report.json").exists()
    assert numbers(run(config(run_dir, resume=True), pieces())) == clean
    return notes


REWARD_FAULTS = [("raise", RuntimeError, "illegal memory access"), ("nan", ValueError, r"non-finite score \(nan\)"),
                 ("inf", ValueError, r"non-finite score \(inf\)"), ("count", ValueError, r"for \d+ texts"),
                 ("slow", TimeoutError, r"reward model KeywordReward took longer than 1 s to score \d+ texts")]


@pytest.mark.parametrize("kind, error, match", [
    pytest.param(*f, marks=[] if f[0] == "nan" else pytest.mark.slow) for f in REWARD_FAULTS])
def test_a_reward_model_fault_names_the_batch_and_the_run_resumes(tmp_path, clean, kind, error, match):
    run_dir = tmp_path / "run"
    reward = faulty(KeywordReward("a"), kind, lambda: (run_dir / "checkpoint.pt").exists())
    notes = stops_then_resumes(run_dir, pieces(reward), error, match, clean)
    (batch,) = [n for n in notes if re.match(r"while scoring a batch of \d+ finished episodes \(prompts '", n)]
    assert any(repr(p) in batch for p in PROMPTS)


@pytest.mark.parametrize("kind, error, match", [
    pytest.param(*f, marks=[] if f[0] == "raise" else pytest.mark.slow) for f in REWARD_FAULTS])
def test_a_judge_fault_during_training_names_the_judge_and_the_run_resumes(tmp_path, clean, kind, error, match):
    run_dir = tmp_path / "run"
    broken = faulty(judge, kind, lambda: (run_dir / "checkpoint.pt").exists())
    match = ("judge judge returned .*" if error is ValueError else "") + match.replace("reward model KeywordReward",
                                                                                        "judge judge")
    notes = stops_then_resumes(run_dir, pieces(judge_fn=broken), error, match, clean)
    assert any(n.startswith("while the judge scored 16 texts, the first ") for n in notes)


@pytest.mark.parametrize("kind, match", [("nan", r"non-finite log-prob \(nan\) to the action of env 0 \(and 15 "),
                                         pytest.param("raise", "illegal memory access", marks=pytest.mark.slow)])
def test_a_reference_model_fault_is_named_and_the_run_resumes(tmp_path, clean, monkeypatch, kind, match):
    import textenv.kl

    run_dir = tmp_path / "run"
    init = textenv.kl._Reference.__init__

    def broken_init(self, *args, **kw):  # the reference's forward (its KV-cached step) breaks once armed
        init(self, *args, **kw)
        step = self.cache.step

        def faulty_step(obs):
            if not (run_dir / "checkpoint.pt").exists():
                return step(obs)
            if kind == "raise":
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            logits, rest = step(obs)
            return logits * np.nan, rest

        self.cache.step = faulty_step

    monkeypatch.setattr(textenv.kl._Reference, "__init__", broken_init)
    with pytest.raises((ValueError, RuntimeError), match=match) as e:
        run(config(run_dir), pieces())
    assert any("last good checkpoint" in n for n in e.value.__notes__)
    if kind == "raise":
        assert any(n.startswith("while the reference model scored the actions of 16 envs") for n in e.value.__notes__)
    monkeypatch.setattr(textenv.kl._Reference, "__init__", init)  # fixed: the resumed run finishes as a clean one
    assert numbers(run(config(run_dir, resume=True), pieces())) == clean


@pytest.mark.slow
def test_a_judge_fault_in_the_report_keeps_the_trained_policy_and_resume_writes_the_report(tmp_path, clean):
    run_dir = tmp_path / "run"
    # the report's judge call scores the 12 held-out texts; training's calls score 16 episodes
    final = lambda: load_checkpoint(run_dir / "checkpoint.pt")["iteration"] == ITERATIONS  # noqa: E731
    broken = faulty(judge, "nan", lambda: (run_dir / "checkpoint.pt").exists() and final())
    with pytest.raises(ValueError, match=r"non-finite score \(nan\)") as e:
        run(config(run_dir), pieces(judge_fn=broken))
    assert any(n.startswith("while the judge scored 12 texts") for n in e.value.__notes__)
    assert load_checkpoint(run_dir / "checkpoint.pt")["iteration"] == ITERATIONS
    assert numbers(run(config(run_dir, resume=True), pieces())) == clean


def test_bad_timeout_and_resume_without_a_run_dir_are_refused(tmp_path):
    from agents.cli import UsageError

    with pytest.raises(UsageError, match="--reward-timeout -1.0 must be >= 0"):
        run(dataclasses.replace(config(tmp_path), reward_timeout=-1.0), pieces())
    cfg = config(tmp_path, resume=True)
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, run_dir=None))
    with pytest.raises(UsageError, match="pass that run's --ppo.run-dir"):
        run(cfg, pieces())


def test_a_full_disk_while_the_policy_is_written_keeps_the_checkpoint_and_resume_writes_it(tmp_path, clean,
                                                                                         monkeypatch):
    """The real policy writer (`save_pretrained`) fails half way through the weights file: no policy folder, whole
    or half, and no temporary one is left; the checkpoint is kept and `--ppo.resume` writes policy and report."""
    import errno

    import transformers.modeling_utils

    from agents.cli import UsageError

    real_save = transformers.modeling_utils.safe_save_file

    def disk_full(tensors, filename, *args, **kw):
        Path(filename).write_bytes(b"half a safetensors file")
        raise OSError(errno.ENOSPC, "No space left on device")

    run_dir = tmp_path / "run"
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    with pytest.raises(UsageError, match=r"could not write the results to .* \(No space left on device\); the "
                                         r"trained run's checkpoint .* is kept: .* with --ppo.resume"):
        run(config(run_dir), pieces())
    assert load_checkpoint(run_dir / "checkpoint.pt")["iteration"] == ITERATIONS
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("policy")) == []  # nothing half written
    assert not (run_dir / "report.md").exists()
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real_save)
    assert numbers(run(config(run_dir, resume=True), pieces())) == clean
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("policy")) == ["policy"]
    assert (run_dir / "policy" / "model.safetensors").read_bytes() != b"half a safetensors file"
