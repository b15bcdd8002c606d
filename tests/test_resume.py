"""Killed with SIGKILL, as the OOM killer or a lost machine would: the RLHF main job resumes with `--ppo.resume` and
ends with the numbers of a run that was never killed; a model build killed half way leaves no artefact marked
complete, and the next run finishes it. Both run the commands a user runs, in subprocesses (the slow set: the
RLHF one builds the embedded models into ./artifacts once, cached)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import without_clocks

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_until(cmd: list[str], line_starts: str, timeout: float = 1200) -> list[str]:
    """Start `cmd`, read its output until a line starts with `line_starts`, then SIGKILL it; returns the lines."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(line_starts):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, "".join(lines[-20:])
    return lines


def rlhf(run_dir: Path, *extra: str) -> list[str]:
    # 8 iterations of the main job's preset, a checkpoint every 2, a small report; with the stale-phrase penalty,
    # whose window of recent texts the checkpoint must carry for the rewards after a resume to be the same
    return [sys.executable, "-m", "agents.rlhf", "embedded", "--ppo.seed", "3", "--ppo.torch-threads", "1",
            "--ppo.total-timesteps", str(8 * 64 * 16), "--ppo.save-every", "2", "--eval-prompts", "32",
            "--best-of-n-prompts", "0", "--stale-phrase-penalty", "1", "--stale-phrase-window", "512",
            "--artifacts-dir", str(ROOT / "artifacts"), "--ppo.run-dir", str(run_dir), *extra]


def numbers(run_dir: Path) -> dict:
    r = json.loads((run_dir / "report.json").read_text())
    return {"before": r["before"], "after": r["after"], "samples": r["samples"], "warnings": r["warnings"],
            "history": without_clocks(r["history"])}


@pytest.mark.slow
def test_a_killed_rlhf_run_resumes_to_the_numbers_of_an_uninterrupted_one(tmp_path):
    subprocess.run(rlhf(tmp_path / "whole"), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=1200)
    killed = tmp_path / "killed"
    lines = run_until(rlhf(killed), "iter    5/8")  # the checkpoint of iteration 4 is written, 5 is under way
    assert any(s.startswith("iter    4/8") for s in lines) and not (killed / "report.json").exists()
    out = subprocess.run(rlhf(killed, "--ppo.resume"), cwd=ROOT, env=ENV, check=True, capture_output=True,
                         text=True, timeout=1200).stdout
    assert "at iteration 4, global_step 4096" in out and "iter    5/8" in out and "iter    4/8" not in out
    resumed, whole = numbers(killed), numbers(tmp_path / "whole")
    assert len(resumed["history"]) == 8 and resumed["after"]["kl_mean"] != 0
    assert resumed == whole


@pytest.mark.slow
def test_a_build_killed_half_way_is_finished_by_the_next_run(tmp_path):
    out = tmp_path / "artifacts"
    cmd = [sys.executable, "-m", "textenv.build", "embedded", "pretrain", "--out-dir", str(out), "--threads", "1",
           "--train-limit", "300", "--test-limit", "60", "--tokenizer.vocab-size", "300", "--gpt.block-size", "32",
           "--gpt.batch-size", "8", "--gpt.max-steps", "400", "--gpt.save-every", "10", "--gpt.log-every", "10",
           "--gpt.eval-every", "1000", "--gpt.no-tensorboard"]
    lines = run_until(cmd, "step 20")
    (folder,) = out.glob("pretrain-*")
    assert not (folder / "build.json").exists(), "".join(lines)  # killed mid-build: not marked complete
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, capture_output=True, text=True, timeout=1200).stdout
    assert "[tokenizer] reusing" in done and "resumed from" in done, done
    record = json.loads((folder / "build.json").read_text())
    assert record["step"] == "pretrain" and not list(out.rglob("*.tmp"))
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(folder).config.n_positions == 32
