"""One PPO iteration of `agents.ppo` + `GPTAgent`, phase by phase, against its compute floor.

The setting (../shared/DESIGN.md, "Reference points"): a GPT-2-architecture policy of 4 layers x 256 with a 4k
vocabulary (random weights from a `GPT2Config`), `TextVectorEnv` + `RefLogprob` (a frozen copy as reference)
with a cheap rule reward (`KeywordReward`), 64 envs, 8-token prompts, the RLHF job's PPO settings
(`agents.rlhf.config.rlhf_ppo`) with 1 minibatch of env columns and 4 epochs. Two cases, timed in the same
rounds:

- `fixed`: every response is 16 tokens (min = max), 17 vector steps per iteration (16 tokens + the autoreset
  step): 64 episodes x 16 tokens per iteration, all rows resetting together.
- `realistic`: each episode's budget is drawn uniformly in 4..16 tokens (`max_new_tokens=(4, 16)`), so rows
  end and reset independently and episodes cross iteration boundaries, as in `agents.rlhf`; the same 17
  vector steps per iteration (~1k tokens).

Phases are timed by calling what `agents.ppo.train` calls, in its order: `collect_rollout`,
`compute_advantages`, `update`, then everything else (`episode_stats`, the KL controller, TensorBoard
logging). Inside the rollout, timing proxies (not edits of the package) measure the policy
(`GPTAgent.get_action_and_value`), the env (`TextVectorEnv.step` without the reward), the reference log-probs
(`RefLogprob`'s reference call) and the reward callable; `other` is the rollout loop's own bookkeeping.

The compute floor, in the same rounds on the same model: one HF `generate` of the same 64 prompts (KV cache,
16 new tokens, pure sampling) plus epochs x forward+backward of the full 64 x 24 batch (log-softmax of the
response positions; no optimizer step). The same floor serves both cases (a realistic iteration runs the same
vector steps). `floor + ref` adds one no-grad forward of the batch through the reference, informational.

The update's forwards are also counted in token positions (real ones, and with each forward's padding) beside
the floor's 64 x 24: a realistic iteration's episode pieces each carry their prompt and, for an episode that began
in the previous iteration, its earlier tokens, so it must process more positions than the floor does;
`update / floor fwd+bwd, per position` is what is left of the update's excess once that is counted.

Each round runs fixed, realistic and the floor back to back (order alternating); the split is the mean over
rounds (it adds up to the mean total), `iteration` and `iteration / floor` are medians over rounds of per-round
values. A cross-check times `agents.ppo.train` itself (fixed case) between its `on_iteration` hooks.

    python benchmarks/ppo_iteration.py                          # CPU, the issue's settings
    python benchmarks/ppo_iteration.py --quick                  # smoke run
    python benchmarks/ppo_iteration.py --device cuda --dtype bf16 --preset gpt2-small --batch 128
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro
from _common import print_table, target, write_result
from rollout import PRESETS, sync, tokenizer  # benchmarks/rollout.py's model shapes, BPE (with fillers)
from transformers import GPT2Config, GPT2LMHeadModel

from agents import distributed, ppo
from agents.advantages import compute_advantages
from agents.gpt_policy import GPTAgent
from agents.kl_control import make_kl_controller
from agents.progress import log_iteration
from agents.rlhf.config import rlhf_ppo
from agents.rollout import Carry, collect_rollout, episode_stats
from textenv import KeywordReward, RefLogprob, TextVectorEnv

PHASES = ["rollout: policy", "rollout: env", "rollout: reference", "rollout: reward", "rollout: other",
          "advantages", "update", "everything else"]  # fmt: skip
FLOOR = ["floor: generate", "floor: fwd+bwd"]


@dataclass
class Args:
    model: Literal["gpt2", "smollm2"] = "gpt2"
    """`gpt2`: a random GPT-2-architecture model of `--preset`'s shape, cases `fixed` and `realistic`; `smollm2`:
    SmolLM2-135M-Instruct (fetched into --artifacts-dir once), cases `all` (every parameter trained) and `top-k`
    (`--trainable-layers`), both fixed-length"""
    trainable_layers: int = 4
    """k of the `smollm2` top-k case"""
    artifacts_dir: str = "artifacts"
    """where `--model smollm2` is fetched to / reused from"""
    preset: str = "small"
    """model shape: `small` (4 layers x 256, 4k vocab), `gpt2-small` (12 x 768, 50k vocab) or `tiny` (tests)"""
    batch: int = 64
    """envs (= prompts of the floor's generate)"""
    prompt_tokens: int = 8
    """tokens per prompt"""
    new_tokens: int = 16
    """response tokens (fixed case; the realistic case's maximum)"""
    min_tokens: int = 4
    """the realistic case's shortest response"""
    epochs: int = 4
    """PPO update epochs (1 minibatch)"""
    warmup: int = 2
    """untimed iterations of each case first"""
    rounds: int = 8
    """timed rounds (fixed, realistic and floor once each)"""
    train_check: bool = True
    """also time `agents.ppo.train` itself (the first case, warmup + rounds iterations)"""
    floor: bool = True
    """also time each case's compute floor (off: only the iterations)"""
    length_groups: bool = True
    """off: one padded forward where rows of similar length get their own (`GPTAgent(group_lengths=False)`): the
    update's episode pieces and the rollout's re-encoding of the mid-episode batch after each update"""
    threads: int = 0
    """torch CPU threads (0 = torch's default: all cores, what a user runs)"""
    device: str = "cpu"
    """torch device"""
    dtype: str = "float32"
    """`float32` or `bf16` (the policy's autocast; the floor uses the same)"""
    texts: int = 3000
    """texts the BPE is trained on and prompts are cut from"""
    quick: bool = False
    """smoke run: 1 warm-up iteration, 2 rounds, 3 train() iterations"""
    out: str | None = None
    """JSON path (default benchmarks/results/ppo_iteration[-gpu].json)"""


class Clock:
    """Wall seconds spent inside the calls it wraps (CUDA synchronised around each call)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds += time.perf_counter() - t0

        return timed


@dataclass
class Case:
    """One PPO run in progress, advanced an iteration at a time exactly as `train` advances it."""

    name: str
    envs: RefLogprob
    agent: GPTAgent
    optimizer: torch.optim.Optimizer
    args: ppo.Args
    carry: Carry
    kl_ctl: object
    writer: object
    clocks: dict[str, Clock]
    global_step: int = 0
    iteration: int = 0


def autocast(device: torch.device, dtype: str):
    if dtype in ("bf16", "bfloat16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_model(args: Args, device: torch.device):
    """(tokenizer, LM, texts, a line saying which texts, fillers) for `--model`."""
    if args.model == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from textenv.build.data import load_texts
        from textenv.build.smollm2 import fetch_smollm2

        folder = fetch_smollm2(args.artifacts_dir)
        tok, lm = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
        data = "../shared/data/imdb" if Path("../shared/data/imdb").is_dir() else "embedded"
        texts = load_texts(data, "train", seed=0).texts[: args.texts]
        return tok, lm.to(device).eval(), texts, f"{len(texts)} {data} training texts", 0
    n_layer, n_embd, n_head, vocab = PRESETS[args.preset]
    tok, texts, source, fillers = tokenizer(vocab, args.texts)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=max(64, args.prompt_tokens + args.new_tokens),
                     n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    return tok, GPT2LMHeadModel(cfg).to(device).eval(), texts, source, fillers


def case_specs(args: Args) -> list[tuple[str, int | tuple[int, int], int | None]]:
    """(name, response budget, trainable_layers) of each case."""
    N = args.new_tokens
    if args.model == "smollm2":
        return [("all", N, None), (f"top-{args.trainable_layers}", N, args.trainable_layers)]
    return [("fixed", N, None), ("realistic", (args.min_tokens, N), None)]


def build(args: Args) -> dict:
    """Tokenizer, model, the two cases and the floor's prompts."""
    from torch.utils.tensorboard import SummaryWriter

    device = torch.device(args.device)
    tok, lm, texts, source, fillers = load_model(args, device)
    reference = copy.deepcopy(lm).eval().requires_grad_(False)
    P, N, E = args.prompt_tokens, args.new_tokens, args.batch
    base = rlhf_ppo(num_envs=E, num_steps=N + 1, num_minibatches=1, update_epochs=args.epochs, anneal_lr=False,
                    device=args.device, torch_threads=args.threads, save_every=0, eval_episodes=0, log_every=0)
    cases = {}
    for name, budget, k in case_specs(args):
        reward, clocks = KeywordReward(["good", "great", "fun"]), {k: Clock(device) for k in PHASES[:4]}
        env = TextVectorEnv(E, tokenizer=tok, reward_model=clocks["rollout: reward"].wrap(reward), prompts=texts,
                            max_prompt_tokens=P, max_new_tokens=budget,
                            min_new_tokens=N if isinstance(budget, int) else args.min_tokens,
                            query_tokens=(P, P))  # fmt: skip
        env.step = clocks["rollout: env"].wrap(env.step)  # an instance attribute: the package is untouched
        agent = GPTAgent(copy.deepcopy(lm), tok.pad_token_id, vocab_size=len(tok), device=device, dtype=args.dtype,
                         trainable_layers=k, group_lengths=args.length_groups)  # fmt: skip
        envs = RefLogprob(env, agent.reference(reference), pad_token_id=tok.pad_token_id, device=device)
        envs.ref.logprobs = clocks["rollout: reference"].wrap(envs.ref.logprobs)
        agent.get_action_and_value = clocks["rollout: policy"].wrap(agent.get_action_and_value)
        optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=base.learning_rate,
                                     eps=1e-5, fused=device.type in ("cpu", "cuda"))  # as train() builds it
        kl_ctl = make_kl_controller(base.kl_controller, base.kl_coef, base.kl_target, base.kl_horizon)
        writer = SummaryWriter(tempfile.mkdtemp(prefix=f"ppo_iteration-{name}-"))
        cases[name] = Case(name, envs, agent, optimizer, base, Carry.start(envs, 1), kl_ctl, writer, clocks)
    first, _ = TextVectorEnv(E, tokenizer=tok, reward_model=KeywordReward(["good"]), prompts=texts,
                             max_prompt_tokens=P, max_new_tokens=N, query_tokens=(P, P)).reset(seed=0)
    prompts = torch.as_tensor(first[:, -P:]).to(device)
    assert (prompts != tok.pad_token_id).all(), "prompts must be exactly --prompt-tokens long"
    return {"tok": tok, "lm": next(iter(cases.values())).agent.lm, "reference": reference, "cases": cases, "prompts": prompts,
            "texts_source": source, "fillers": fillers, "device": device, "ppo_args": base, "parameters": sum(p.numel() for p in lm.parameters())}


def run_iteration(case: Case) -> dict[str, float]:
    """One PPO iteration of `case` as `train` runs it; returns wall seconds per phase (PHASES) and `total`."""
    a, device = case.args, case.agent.device
    before = {k: c.seconds for k, c in case.clocks.items()}
    pos_before = dict(case.agent.positions)  # the token positions the update's forwards ran
    case.iteration += 1
    sync(device)
    t0 = time.perf_counter()
    kl_coef = case.kl_ctl.coef
    rollout = collect_rollout(case.envs, case.agent, case.carry, a.num_steps, case.global_step, a.num_envs,
                              kl_coef, device)  # fmt: skip
    case.global_step += a.num_steps * a.num_envs
    sync(device)
    t1 = time.perf_counter()
    compute_advantages(rollout, case.agent, kl_coef, a.gamma, a.gae_lambda, a.bootstrap_truncated, a.advantage_mode)
    sync(device)
    t2 = time.perf_counter()
    stats = ppo.update(case.agent, case.optimizer, rollout, a, a.clip_coef, distributed.SINGLE)
    sync(device)
    t3 = time.perf_counter()
    new_returns, kls, stats = episode_stats(rollout, stats, kl_coef, distributed.SINGLE)
    if kls:
        case.kl_ctl.update(float(np.mean(kls)), len(kls))
    log_iteration(case.writer, stats, None, case.iteration, case.global_step, rollout)  # train()'s TensorBoard logging
    sync(device)
    t4 = time.perf_counter()
    out = {k: c.seconds - before[k] for k, c in case.clocks.items()}
    out["rollout: env"] -= out["rollout: reward"]  # the env's step includes the reward call
    out["rollout: other"] = (t1 - t0) - sum(out[k] for k in PHASES[:4])
    out.update({"advantages": t2 - t1, "update": t3 - t2, "everything else": t4 - t3, "total": t4 - t0,
                "tokens": int(rollout.valid.sum())})
    out.update({f"update positions {k}": (v - pos_before[k]) / a.update_epochs for k, v in case.agent.positions.items()})
    return out


def run_floor(lm, prompts: torch.Tensor, reference, args: Args, pad: int, split=None) -> dict:
    """The compute floor: `generate` of the batch, then epochs x forward+backward of the 64 x 24 result. With
    `split` (a `textenv.lm.trunk.TrunkSplit` of `lm`), the top-k floor: the trunk's outputs are what `generate`
    already computed (not timed again), so each epoch differentiates only the top blocks and the head."""
    device, P = prompts.device, prompts.shape[1]
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(device, args.dtype):
        ids = lm.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                          top_p=1.0, temperature=1.0, min_new_tokens=args.new_tokens,
                          max_new_tokens=args.new_tokens, pad_token_id=pad)  # fmt: skip  # (B, P + N)
    sync(device)
    t1 = time.perf_counter()
    if split is not None:
        inputs = split.trunk.full(ids)  # generate computed these; untimed
        pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
        top = lambda model: model.get_output_embeddings()(  # noqa: E731
            split.top(inputs_embeds=inputs, position_ids=pos, use_cache=False).last_hidden_state)
        sync(device)
        t1 += time.perf_counter() - t1  # the untimed trunk forward does not count
    for _ in range(args.epochs):
        with autocast(device, args.dtype):
            logits = top(lm) if split is not None else lm(input_ids=ids).logits  # (B, P + N, V)
        logp = torch.log_softmax(logits[:, P - 1 : -1].float(), dim=-1)  # (B, N, V): the response positions
        loss = -logp.gather(-1, ids[:, P:, None]).mean()
        loss.backward()
    sync(device)
    t2 = time.perf_counter()
    with torch.no_grad(), autocast(device, args.dtype):  # the reference: its top blocks only over a shared trunk
        ref = split.sharing(reference) if split is not None else None
        (ref.head(ref.top(inputs_embeds=inputs, position_ids=pos, use_cache=False).last_hidden_state)
         if ref is not None else reference(input_ids=ids).logits).float().log_softmax(-1)  # fmt: skip
    sync(device)
    t3 = time.perf_counter()
    lm.zero_grad(set_to_none=True)
    return {"floor: generate": t1 - t0, "floor: fwd+bwd": t2 - t1, "floor": t2 - t0, "ref fwd": t3 - t2,
            "positions": ids.numel()}


class HookClock:
    """`train`'s `hooks`: the time between consecutive `on_iteration` calls (one whole iteration each)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_iteration(self, iteration, global_step, rollout, writer) -> None:
        self.times.append(time.perf_counter())


def train_check(built: dict, args: Args, iterations: int) -> list[float]:
    """Seconds per iteration of `agents.ppo.train` itself (hook to hook) on the headline case: the top-k one if
    there is one (its agent and envs continue: the reference shares that agent's trunk), else a fresh agent on
    the untrained weights (a copy of the reference: the KL starts at 0) in the first case's envs."""
    case = next((c for c in built["cases"].values() if c.agent.split is not None), None)
    if case is not None:
        agent = case.agent
    else:
        case = next(iter(built["cases"].values()))
        lm = copy.deepcopy(built["reference"]).requires_grad_(True)
        agent = GPTAgent(lm, built["tok"].pad_token_id, vocab_size=len(built["tok"]), device=built["device"],
                         dtype=args.dtype)
    a = dataclasses.replace(case.args, total_timesteps=iterations * case.args.num_steps * case.args.num_envs,
                            run_dir=tempfile.mkdtemp(prefix="ppo_iteration-train-"))
    hooks = HookClock()
    ppo.train(a, envs=case.envs, agent=agent, hooks=hooks, dist=distributed.SINGLE)
    return list(np.diff(hooks.times))


def floors(built: dict) -> dict:
    """Each case's floor: the whole model's, or the top-k floor for a case with a frozen trunk."""
    return {name: ("floor" if case.agent.split is None else f"floor {name}") for name, case in built["cases"].items()}


def floor_of(built: dict, name: str, args: Args) -> dict:
    case, pad = built["cases"][name], built["tok"].pad_token_id
    return run_floor(case.agent.lm, built["prompts"], built["reference"], args, pad, case.agent.split)


def measure(built: dict, args: Args) -> dict:
    """Warm-up, then `rounds` rounds of every case and every floor (order alternating); per-round records."""
    cases, of = built["cases"], floors(built)
    for case in cases.values():
        for _ in range(args.warmup):
            run_iteration(case)
    jobs = [(name, "case") for name in cases] + [(name, "floor") for name in dict.fromkeys(of.values()) if args.floor]
    first = {f: next(n for n in cases if of[n] == f) for f in set(of.values())}
    for f in (set(of.values()) if args.floor else ()):
        floor_of(built, first[f], args)  # warm-up
    rounds: dict[str, list[dict]] = {name: [] for name, _ in jobs}
    for r in range(args.rounds):
        for name, kind in jobs if r % 2 == 0 else jobs[::-1]:
            rounds[name].append(run_iteration(cases[name]) if kind == "case" else floor_of(built, first[name], args))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{name} {rs[-1]['total' if kind == 'case' else 'floor']:.3f} s" for (name, kind), rs in
            zip(jobs, [rounds[n] for n, _ in jobs], strict=True)), flush=True)  # fmt: skip
    return rounds


def summarise(rounds: dict, built: dict) -> dict:
    """Mean split (adds up to the mean total), median iteration and median per-round ratio to its floor."""
    out = {}
    for f in set(floors(built).values()) & set(rounds):
        fs = rounds[f]
        out[f] = {"median_s": statistics.median(x["floor"] for x in fs),
                  "mean_split_s": {k: statistics.mean(x[k] for x in fs) for k in FLOOR},
                  "median_floor_plus_ref_s": statistics.median(x["floor"] + x["ref fwd"] for x in fs),
                  "positions": fs[0]["positions"]}
    for name, f in floors(built).items():
        rs, fs = rounds[name], rounds.get(f)
        out[name] = {"median_s": statistics.median(x["total"] for x in rs),
                     "mean_s": statistics.mean(x["total"] for x in rs),
                     "mean_split_s": {k: statistics.mean(x[k] for x in rs) for k in PHASES},
                     "tokens_per_iteration": statistics.mean(x["tokens"] for x in rs),
                     "update_positions": {k: statistics.mean(x[f"update positions {k}"] for x in rs)
                                          for k in ("real", "padded")}, "per_round": rs}  # fmt: skip
        if fs:
            out[name]["floor"] = f
            out[name]["ratio_to_floor"] = statistics.median(x["total"] / y["floor"] for x, y in zip(rs, fs, strict=True))
            out[name]["ratio_to_floor_plus_ref"] = statistics.median(
                x["total"] / (y["floor"] + y["ref fwd"]) for x, y in zip(rs, fs, strict=True))
            # the update's cost per (padded) position against the floor's forward+backward per position: what is
            # left of the update's excess once the extra positions a case needs are counted
            out[name]["update_over_floor_per_position"] = statistics.median(
                (x["update"] / max(x["update positions padded"], 1)) / (y["floor: fwd+bwd"] / y["positions"])
                for x, y in zip(rs, fs, strict=True))
    return out


def targets_of(s: dict, args: Args, names: list[str]) -> list[dict]:
    if args.model == "smollm2":
        whole, top = (s[n] for n in names)
        speedup = whole["median_s"] / top["median_s"]
        return [target("smollm2_topk_iteration_s", round(top["median_s"], 2), "<= 10", top["median_s"] <= 10),
                target("smollm2_full_over_topk", round(speedup, 2), ">= 3.5", speedup >= 3.5)]
    out = [target(f"iteration_over_floor_{n}", round(s[n]["ratio_to_floor"], 3), limit, s[n]["ratio_to_floor"] <= float(limit[3:]))
           for n, limit in zip(names, ("<= 1.15", "<= 1.25"), strict=True) if "ratio_to_floor" in s[n]]  # fmt: skip
    if args.device.startswith("cuda") and args.preset == "gpt2-small":
        out.append(target("gpt2_small_iteration_s", round(s[names[0]]["median_s"], 3), "<= 3.0", s[names[0]]["median_s"] <= 3.0))
    return out


def main(args: Args) -> None:
    if args.quick:
        args.warmup, args.rounds = 1, 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    built = build(args)
    names = list(built["cases"])
    s = summarise(measure(built, args), built)
    rows = [[k] + [v for n in names for v in (s[n]["mean_split_s"][k], f"{100 * s[n]['mean_split_s'][k] / s[n]['mean_s']:.1f}%")]
            for k in PHASES]  # fmt: skip
    rows += [["iteration (mean)"] + [v for n in names for v in (s[n]["mean_s"], "100%")],
             ["iteration (median)"] + [v for n in names for v in (s[n]["median_s"], "")],
             ["tokens per iteration"] + [v for n in names for v in (s[n]["tokens_per_iteration"], "")],
             ["update positions (real / padded)"] + [v for n in names for v in (
                 f"{s[n]['update_positions']['real']:.0f} / {s[n]['update_positions']['padded']:.0f}", "")]]
    if args.floor:
        for k in FLOOR:
            rows.append([k] + [v for n in names for v in (s[s[n]["floor"]]["mean_split_s"][k], "")])
        rows += [["floor (median)"] + [v for n in names for v in (s[s[n]["floor"]]["median_s"], "")],
                 ["iteration / floor"] + [v for n in names for v in (s[n]["ratio_to_floor"], "")],
                 ["iteration / (floor + ref fwd)"] + [v for n in names for v in (s[n]["ratio_to_floor_plus_ref"], "")],
                 ["floor fwd+bwd positions"] + [v for n in names for v in (s[s[n]["floor"]]["positions"], "")],
                 ["update / floor fwd+bwd, per position"]
                 + [v for n in names for v in (s[n]["update_over_floor_per_position"], "")]]
    header = [f"{n} {case.args.num_steps - 1} tokens" if n != "realistic" else f"realistic {args.min_tokens}-{args.new_tokens}"
              for n, case in built["cases"].items()]  # fmt: skip
    print_table(["phase (s)"] + [v for h in header for v in (h, "share")], rows)
    train_times = []
    if args.train_check:
        n = 3 if args.quick else args.warmup + args.rounds
        train_times = train_check(built, args, n)[1:]  # the first interval still warms up
        if train_times:
            head = names[-1] if args.model == "smollm2" else names[0]
            print(f"agents.ppo.train, {head} case: {statistics.median(train_times):.3f} s per iteration (median "
                  f"of {len(train_times)}; phased loop above: {s[head]['median_s']:.3f} s)")
    targets = targets_of(s, args, names)
    for t in targets:
        print(f"target {t['name']}: {t['value']} (want {t['target']}) -> {'met' if t['met'] else 'NOT met'}")
    cfg = built["lm"].config
    results = {
        "model": {"name": args.model, "preset": args.preset if args.model == "gpt2" else None,
                  "n_layer": cfg.num_hidden_layers, "n_embd": cfg.hidden_size, "vocab": len(built["tok"]),
                  "filler_tokens": built["fillers"], "parameters": built["parameters"]},
        "cases": {n: {"trainable_layers": c.agent.split.k if c.agent.split else None,
                      "trainable_parameters": sum(p.numel() for p in c.agent.parameters() if p.requires_grad)}
                  for n, c in built["cases"].items()},
        "texts": built["texts_source"], "batch": args.batch, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "realistic_tokens": [args.min_tokens, args.new_tokens], "epochs": args.epochs,
        "num_steps": built["ppo_args"].num_steps, "device": args.device, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "warmup": args.warmup, "rounds": args.rounds,
        "length_groups": args.length_groups,
        **s, "train_check_s_per_iteration": train_times,
    }  # fmt: skip
    name = "ppo_iteration" if args.model == "gpt2" else f"ppo_iteration_{args.model}"
    print(f"wrote {write_result(name, results, targets, args.quick, args.out)}")


if __name__ == "__main__":
    main(tyro.cli(Args))
