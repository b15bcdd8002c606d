"""RLHF end to end, one command: a GPT policy tuned by PPO inside TextEnv against a sentiment reward model.

    python -m agents.rlhf                                   # preset `embedded`: no network, 2 CPU cores
    python -m agents.rlhf imdb                              # preset `imdb`: ../shared/data/imdb
    python -m agents.rlhf embedded --ppo.learning-rate 1e-4 # a preset, then any flag (see --help)
    python -m agents.rlhf imdb --data-dir aclImdb --policy gpt2 --reward-model lvwerra/distilbert-imdb --ppo.device cuda
    torchrun --standalone --nproc-per-node 2 -m agents.rlhf  # data-parallel PPO: --ppo.num-envs is per process

The first builds everything (cached; a second run reuses it) and trains, in minutes on 2 CPU cores. The fourth
uses the seed's hub models (online) in bf16 on a GPU.

The recipe (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593, as the seed reproduces it):
1. Models: a BPE tokenizer, a small GPT-2-architecture LM, a DistilBERT-architecture sentiment reward model
   and a held-out judge, built from the data by `textenv.build.build_all` (cached; a second run reuses them),
   or given as local folders / hub names (`--policy`, `--reward-model`).
2. Environment: `gymnasium.make_vec("TextEnv-v0")` draws a prompt (a 2-8 token query cut from a review),
   the policy writes 4-16 tokens, the reward model scores prompt + completion (positive-class logit).
   `textenv.kl.RefLogprob` adds each token's log-prob under a frozen copy of the pretrained policy.
3. PPO (`agents.ppo.train`, the same loop that solves CartPole) with `GPTAgent`: gamma 1, lambda 0.95,
   clip 0.2, value clip 0.2, vf_coef 0.1, 4 epochs, per-token KL penalty whose coefficient (init 0.2) a PID
   controller holds at the preset's setpoint (`agents.kl_control`, `agents.rlhf.config`),
   minibatches of env columns; `agents.rlhf.logger` logs over-optimisation signals and warns.
4. Report (`agents.rlhf.report`): held-out prompts before and after; reward, positive rate by the reward model
   and by the judge, KL to the reference, reference perplexity, distinct-n and the collapse signals, warnings,
   sample pairs (all of them in report.json); Markdown + JSON + PNG.

Every bad input (vocabulary, EOS, classifier folder, data, context length) fails before any training; each is
checked once, where it enters (`check_config`, `prepare` for what it loads or builds, `check_pieces` for pieces
passed in).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from agents import distributed, sharding
from agents.checkpoint import check_creatable, writable_dir, written
from agents.cli import UsageError, parse_cli, run_cli
from agents.distributed import Dist
from agents.rlhf.config import PRESETS, RLHFConfig, check_config
from agents.rlhf.pieces import Pieces, check_pieces, guarded, load_pieces
from agents.vector import resolve_device, set_torch_threads  # one device, one thread rule for PPO and job

BUILD_TIMEOUT_S = 3 * 3600.0  # torchrun: how long the other ranks wait while rank 0 builds the models


def make_training_envs(cfg: RLHFConfig, pieces: Pieces, reward_fn: Any, reference: Any, device: torch.device):
    """`gymnasium.make_vec("TextEnv-v0")` (the batched vector env; prompts in groups of `group_size`) wrapped with
    the reference log-probs."""
    import gymnasium as gym

    import textenv  # noqa: F401  (registers TextEnv-v0)
    from textenv.kl import RefLogprob

    groups = {"group_size": cfg.group_size} if cfg.group_size > 1 else {}
    envs = gym.make_vec("TextEnv-v0", num_envs=cfg.ppo.num_envs, vectorization_mode="vector_entry_point",
                        tokenizer=pieces.tokenizer, reward_model=reward_fn, prompts=pieces.train_prompts,
                        episode=cfg.episode, action_mask=action_mask(cfg, pieces.tokenizer), **groups)
    return RefLogprob(envs, reference, pad_token_id=pieces.tokenizer.pad_token_id, device=device,
                      temperature=cfg.temperature)


def action_mask(cfg: RLHFConfig, tokenizer: Any) -> Any:
    """The envs' action mask (training, report, best-of-n alike): `NoRepeatNgram` with `no_repeat_ngram`,
    `NoRepeatWord` with `no_repeat_word`, both together, or None."""
    from textenv.masks import AllMasks, NoRepeatNgram, NoRepeatWord

    masks = [NoRepeatNgram(cfg.no_repeat_ngram, len(tokenizer))] if cfg.no_repeat_ngram else []
    masks += [NoRepeatWord(tokenizer, cfg.no_repeat_word)] if cfg.no_repeat_word else []
    return None if not masks else masks[0] if len(masks) == 1 else AllMasks(len(tokenizer), *masks)


def training_reward(cfg: RLHFConfig, pieces: Pieces, before: tuple | None, dist: Dist) -> Any:
    """The reward PPO trains on: the reward model's score (`reward_output`: its logit, or its P(positive)), or
    with `normalize_reward` that score standardised by its mean and std over the initial policy's held-out samples
    (rank 0's, sent to every rank); less `repeated_words_penalty` times the text's share of repeated words and
    `stale_phrase_penalty` times its share of word pairs the latest training texts used."""
    from textenv.rewards import NormalizedReward, RepetitionPenalty, StalePhrasePenalty

    prob = cfg.reward_output == "prob"  # `check_pieces` made sure hand-built pieces have a P(positive)
    reward = pieces.reward_positive_fn if prob else pieces.reward_fn
    if cfg.normalize_reward:
        keys = ("reward_prob_mean", "reward_prob_std") if prob else ("reward_mean", "reward_std")
        stats = distributed.broadcast_object(None if before is None else tuple(before[0][k] for k in keys), dist)
        reward = NormalizedReward(reward, *stats)
    if cfg.repeated_words_penalty:
        reward = RepetitionPenalty(reward, cfg.repeated_words_penalty)
    if cfg.stale_phrase_penalty:
        reward = StalePhrasePenalty(reward, cfg.stale_phrase_penalty, cfg.stale_phrase_window)
    return reward


def held_out(cfg: RLHFConfig, pieces: Pieces):
    """The report's evaluation set: one definition of "before" (the reference) and "after" (the tuned policy)."""
    from agents.rlhf.report import HeldOut

    return HeldOut(pieces.tokenizer, pieces.eval_prompts, pieces.reward_fn, cfg.episode,
                   reward_positive_fn=pieces.reward_positive_fn, judge_fn=pieces.judge_fn, seed=cfg.ppo.seed + 12345,
                   original=pieces.original, temperature=cfg.temperature, real=pieces.real_texts,
                   action_mask=action_mask(cfg, pieces.tokenizer))


def run(cfg: RLHFConfig, pieces: Pieces | None = None, dist: Dist | None = None) -> dict:
    """Build (or take) the pieces, train with PPO, write the report; returns the report record (with `run_dir`,
    the folder used, also when `cfg.ppo.run_dir` is None). Under torchrun pass the process group the entry point
    set up (`distributed.setup`): ranks other than 0 return {}."""
    from agents.gpt_policy import GPTAgent
    from agents.ppo import num_iterations, train
    from agents.rlhf.report import evaluate_held_out

    dist, t0 = distributed.given(dist), time.time()
    cfg = _smoke(cfg, dist.world_size) if cfg.quick else cfg
    check_config(cfg)
    if cfg.ppo.run_dir and dist.is_main:
        check_creatable(cfg.ppo.run_dir)  # before the models are built: an unwritable folder costs nothing
    device = resolve_device(distributed.rank_device(cfg.ppo.device, dist))  # torchrun + CUDA: one GPU per rank
    set_torch_threads(cfg.ppo.torch_threads)  # 0: all cores, or 1 when the machine is already busy (as agents.ppo)
    if pieces is None:
        with distributed.rank_zero_first(dist):  # rank 0 builds the cache (no lock), the others then reuse it
            pieces = load_pieces(cfg, device)
    else:
        check_pieces(pieces, cfg)
    pieces = guarded(pieces, cfg.reward_timeout)  # a hung, NaN or miscounting scorer stops the run by name
    t_built = time.time()
    run_dir = _run_dir(cfg, dist)

    dtype = ("bf16" if device.type == "cuda" else "float32") if cfg.dtype == "auto" else cfg.dtype
    policy = pieces.policy.to(device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)  # frozen: the KL anchor and "before"
    # the value head's initial weights come from the global RNG, whose state here depends on what ran before
    # (a build, a load): seed it, or two runs of one seed part after their first update
    torch.manual_seed(cfg.ppo.seed)
    agent = GPTAgent(policy, pieces.tokenizer.pad_token_id, len(pieces.tokenizer), device=device, dtype=dtype,
                     trainable_layers=cfg.trainable_layers, temperature=cfg.temperature)
    evaluation = held_out(cfg, pieces)  # the held-out prompts through the env, stepped by the policy
    before, baselines = _before(cfg, reference, evaluation) if dist.is_main else (None, {})
    # with trainable_layers the reference runs only its top blocks, over the policy's frozen trunk
    reward = training_reward(cfg, pieces, before, dist)
    envs = make_training_envs(cfg, pieces, reward, agent.reference(reference), device)
    t_ppo = time.time()
    args = dataclasses.replace(cfg.ppo, device=str(device), run_dir=str(run_dir))
    logger = _logger(cfg, pieces, num_iterations(args, dist.world_size), dist, reward)
    result = train(args, envs=envs, agent=agent, hooks=logger, dist=dist)  # logs and saves on rank 0 only
    envs.close()
    agent = sharding.unsharded(agent, lambda: _like(agent, copy.deepcopy(reference)), dist)  # --ppo.shard: rank 0
    if not dist.is_main:
        return {}
    t_eval = time.time()
    after = evaluate_held_out(agent, reference, evaluation)  # the trained agent as it samples in training
    # the saved policy samples as it was trained: `generate` reads its temperature from the generation config
    agent.lm.generation_config.update(do_sample=True, temperature=cfg.temperature, top_k=None, top_p=None,
                                      no_repeat_ngram_size=cfg.no_repeat_ngram or None)
    with _results_written(run_dir):  # the model and its tokenizer in a temporary folder, moved into place whole
        written(run_dir / "policy", lambda tmp: (agent.lm.save_pretrained(tmp), pieces.tokenizer.save_pretrained(tmp)))
    timing = {"prepare_s": t_built - t0, "ppo_s": t_eval - t_ppo, "eval_s": time.time() - t_eval,
              "total_s": time.time() - t0, "ppo_tokens": result["global_step"], "ppo_sps": result["sps"],
              "final_kl_coef": result["kl_coef"], "device": str(device), "dtype": dtype,
              "torch_threads": torch.get_num_threads()}
    with _results_written(run_dir):
        return _report(run_dir, cfg, pieces, (before, after), logger, {"timing": timing, **baselines})


def _logger(cfg: RLHFConfig, pieces: Pieces, iterations: int, dist: Dist, reward: Any) -> Any:
    """The RLHF logger, the judge beside the reward model. A training reward with a memory (the stale-phrase window)
    is checkpointed with the history: rank 0's, so under torchrun every rank resumes with rank 0's window."""
    from agents.rlhf.logger import RLHFLogger

    logger = RLHFLogger(pieces.tokenizer, iterations, cfg.sample_every, world_size=dist.world_size,
                        judge_fn=pieces.judge_fn)
    logger.reward_state = reward if hasattr(reward, "state_dict") else None
    return logger


def _like(agent: Any, lm: torch.nn.Module) -> Any:
    """A GPTAgent over `lm` built as `agent` was (for the whole policy gathered from a sharded one's shards)."""
    from agents.gpt_policy import GPTAgent

    split = agent.split.k if agent.split is not None else None
    return GPTAgent(lm, agent.pad_token_id, agent.vocab_size, device=agent.device,
                    dtype=agent.autocast_dtype or "float32", trainable_layers=split,
                    group_lengths=agent.group_lengths, temperature=agent.temperature)


def _run_dir(cfg: RLHFConfig, dist: Dist) -> Path:
    """The run's folder, one for all ranks (their clocks may differ), made and checked writable by rank 0."""
    run_dir = Path(distributed.broadcast_object(
        cfg.ppo.run_dir or f"runs/{cfg.ppo.exp_name}-{cfg.models}-{cfg.ppo.seed}-{int(time.time())}", dist))
    if dist.is_main:
        writable_dir(run_dir)
    return run_dir


@contextlib.contextmanager
def _results_written(run_dir: Path):
    """A full disk or a folder gone read-only while the policy or the report is written: one error line; the
    final checkpoint, written before, is what `--ppo.resume` writes them from."""
    try:
        yield
    except OSError as e:
        raise UsageError(f"could not write the results to {run_dir} ({e.strerror or e}); the trained run's "
                         f"checkpoint in {run_dir} is kept: free disk space, then run the same command "
                         f"with --ppo.resume --ppo.run-dir {run_dir} to write them") from None


def _before(cfg: RLHFConfig, reference: torch.nn.Module, evaluation: Any) -> tuple[tuple, dict]:
    """The initial policy on the held-out prompts, and its best-of-n baseline ({} without one)."""
    from agents.rlhf.baselines import best_of_n
    from agents.rlhf.report import evaluate_held_out
    from agents.rlhf.yardstick import yardstick

    before = evaluate_held_out(reference, reference, evaluation)
    m = before[0]
    print(f"before: reward {m['reward_mean']:+.3f}, positive {m['positive_rate_reward_model']:.2f} (judge "
          f"{m['positive_rate_judge']}), distinct-2 {m['distinct_2']:.3f}", flush=True)
    real = {"real_reviews": r} if (r := yardstick(evaluation, before[1])) else {}
    if real:
        print(f"real reviews of the same length: positive {r['positive_rate_reward_model']:.2f} by the reward model "
              f"(judge {r.get('positive_rate_judge')}), distinct-2 {r['distinct_2']:.3f}", flush=True)
    if not cfg.best_of_n_prompts:
        return before, real
    bon = best_of_n(reference, reference, evaluation, cfg.best_of_n, cfg.best_of_n_prompts)
    print("best-of-n: " + ", ".join(f"n={r['n']} judge {r['positive_rate_judge']} reward model "
                                    f"{r['positive_rate_reward_model']:.2f}" for r in bon["rows"]), flush=True)
    return before, {"best_of_n": bon, **real}


def _smoke(cfg: RLHFConfig, world_size: int) -> RLHFConfig:
    """`--quick`: 6 PPO iterations (of all ranks together) and a small report."""
    batch = cfg.ppo.num_envs * cfg.ppo.num_steps * world_size
    return dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, total_timesteps=6 * batch),
                               eval_prompts=min(cfg.eval_prompts, 64))


def _report(run_dir: Path, cfg: RLHFConfig, pieces: Pieces, evaluations: tuple, logger: Any, extra: dict) -> dict:
    """Write the report of the (before, after) evaluations and print its summary lines; returns the report record.
    `extra` (timing, the best-of-n baseline) joins the record."""
    from agents.rlhf.report import write_report

    record = write_report(run_dir, *evaluations, history=logger.history, warnings=logger.warnings,
                          config=_jsonable(dataclasses.asdict(cfg)),
                          extra={**extra, "pieces": pieces.info, "run_dir": str(run_dir)})
    a, b = record["after"], record["before"]
    print(f"after:  reward {a['reward_mean']:+.3f} (gain {a['reward_mean'] - b['reward_mean']:+.3f}), positive "
          f"{a['positive_rate_reward_model']:.2f} (judge {a['positive_rate_judge']}), KL {a['kl_mean']:.2f}, ref ppl "
          f"{a['ref_perplexity']:.1f} (was {b['ref_perplexity']:.1f}), distinct-2 {a['distinct_2']:.3f} "
          f"(was {b['distinct_2']:.3f}); total {extra['timing']['total_s']:.0f}s")
    for w in record["warnings"][len(logger.warnings):]:
        print(f"warning: {w}")
    print(f"report: {run_dir / 'report.md'}")
    return record


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def parse_args(argv: list[str] | None = None) -> RLHFConfig:
    """The preset named first (`embedded` when none is), then flags overriding it: `imdb --ppo.seed 2`."""
    import tyro

    presets = {name: make() for name, make in PRESETS.items()}
    preset_type = tyro.extras.subcommand_type_from_defaults(
        presets, {name: make.__doc__ for name, make in PRESETS.items()})
    # CascadeSubcommandArgs: flags without a preset name apply to the default one (`--ppo.seed 2` = embedded)
    return parse_cli(preset_type, default=presets["embedded"], args=argv, prog="python -m agents.rlhf",
                     description=__doc__, config=(tyro.conf.CascadeSubcommandArgs,))


def main() -> None:
    """`python -m agents.rlhf`: a user's mistake prints one `error:` line (exit 2), a bug its traceback. Under
    torchrun it sets up the process group (long timeout: rank 0 may build the models while the others wait)."""
    def job() -> None:
        cfg = parse_args()
        dist, _ = distributed.setup(cfg.ppo.device, timeout_s=BUILD_TIMEOUT_S)
        run(cfg, dist=dist)
        distributed.cleanup(dist)

    run_cli(job)
    distributed.exit_worker(0)  # torchrun: skip the interpreter teardown that now and then aborts a gloo rank
