"""PPO with a tiny GPTAgent (from scratch, built from a config) on the worked multi-turn examples of `textenv.tasks`:
the calculator tool and the guessing game. Used by `benchmarks/tools.py`, the notebook `04_tools_and_turns` and the
slow tests, so all three measure the same thing.

    from agents.worked_examples import run
    run("guessing", steps=16_384, episodes=200, seed=0)  # {"random", "before", "after", "stderr", ...}
"""

from __future__ import annotations

import tempfile
import time

import gymnasium as gym
import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from agents import ppo
from agents.gpt_policy import GPTAgent
from textenv import TextEnv
from textenv.tasks import calculator_task, guessing_task

TASKS = {"calculator": calculator_task, "guessing": guessing_task}


def task_envs(task: str, n: int) -> gym.vector.SyncVectorEnv:
    """`n` copies of the task's TextEnv (interactions run in the single env: a SyncVectorEnv)."""
    return gym.vector.SyncVectorEnv([lambda: TextEnv(**TASKS[task]()) for _ in range(n)])


def tiny_agent(task: str, seed: int, width: int = 32) -> GPTAgent:
    """A 2-layer GPT-2-architecture policy of `width` (random init, seeded) over the task's char vocabulary."""
    kw = TASKS[task]()
    tok = kw["tokenizer"]
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=kw["max_context_tokens"], n_embd=width, n_layer=2, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return GPTAgent(GPT2LMHeadModel(cfg), tok.pad_token_id, vocab_size=len(tok))


def success_rate(policy, task: str, episodes: int, seed: int) -> float:
    """Mean final score of `episodes` episodes; `policy(obs, mask) -> actions` (None: uniform over allowed)."""
    return held_out_stats(policy, task, episodes, seed)["score"]


@torch.no_grad()
def held_out_stats(policy, task: str, episodes: int, seed: int) -> dict:
    """{"score": mean final score, "called": share of episodes with a tool call} over `episodes` episodes."""
    envs, rng = task_envs(task, 16), np.random.default_rng(seed)
    obs, infos = envs.reset(seed=seed)
    scores: list[float] = []
    called: list[bool] = []
    while len(scores) < episodes:
        mask = infos["action_mask"]
        if policy is None:
            actions = np.array([rng.choice(np.flatnonzero(m)) for m in mask])
        else:
            actions = policy(torch.as_tensor(obs), torch.as_tensor(mask))
        obs, _, term, trunc, infos = envs.step(actions)
        done = term | trunc
        scores += [float(s) for s, d in zip(infos.get("score", []), done, strict=False) if d]
        called += ["calc:" in t for t, d in zip(infos.get("text", []), done, strict=False) if d]
    return {"score": float(np.mean(scores[:episodes])), "called": float(np.mean(called[:episodes]))}


def run(task: str, steps: int, episodes: int, seed: int, width: int = 32, greedy: bool = False, **overrides) -> dict:
    """Success rates of the random masked policy, the untrained and the PPO-trained tiny GPTAgent (`steps` env steps;
    `overrides` replace `agents.ppo.Args` fields) on the same held-out episodes, sampled (temperature 1) and, with `greedy`, greedy,
    with the standard error of the sampled rates' difference, the share of episodes that call a tool before and
    after ("called_before", "called_after") and the training time."""
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and more threads on busy cores are much slower
    agent = tiny_agent(task, seed, width)
    sample = lambda obs, mask: agent.act(obs, deterministic=False, action_mask=mask).numpy()  # noqa: E731
    argmax = lambda obs, mask: agent.act(obs, deterministic=True, action_mask=mask).numpy()  # noqa: E731
    random, before = held_out_stats(None, task, episodes, 10_000), held_out_stats(sample, task, episodes, 10_000)
    out = {"random": random["score"], "before": before["score"], "called_before": before["called"]}
    if greedy:
        out["before_greedy"] = success_rate(argmax, task, episodes, seed=10_000)
    settings = dict(learning_rate=3e-3, num_envs=16, num_steps=32, minibatch_by_env=True, num_minibatches=4,
                    update_epochs=8, gamma=1.0, bootstrap_truncated=False, ent_coef=0.0) | overrides  # tuned on seed 0
    start = time.time()
    with tempfile.TemporaryDirectory(prefix=f"tools-{task}-") as run_dir:
        args = ppo.Args(total_timesteps=steps, eval_episodes=0, save_every=0, log_every=0, torch_threads=1, seed=seed,
                        run_dir=run_dir, **settings)
        ppo.train(args, envs=task_envs(task, args.num_envs), agent=agent)
    out["train_seconds"] = time.time() - start
    after = held_out_stats(sample, task, episodes, 10_000)
    out["after"], out["called_after"] = after["score"], after["called"]
    if greedy:
        out["after_greedy"] = success_rate(argmax, task, episodes, seed=10_000)
    before, after = out["before"], out["after"]
    out["stderr"] = float(np.sqrt((before * (1 - before) + after * (1 - after)) / episodes))
    return out | {"env_steps": steps, "width": width, "ppo": settings}
