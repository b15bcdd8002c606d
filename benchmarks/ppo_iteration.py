"""One PPO iteration of `agents.ppo` + `GPTAgent`, phase by phase, against its compute floor (issue 14).

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
from typing import Literal

import numpy as np
import torch
import tyro
from _common import print_table, target, write_result
from rollout import PRESETS, sync, tokenizer  # benchmarks/rollout.py's model shapes, BPE (with fillers)
from transformers import GPT2Config, GPT2LMHeadModel

from agents import distributed, ppo
from agents.gpt_policy import GPTAgent
from agents.kl_control import make_kl_controller
from agents.rlhf.config import rlhf_ppo
from agents.rollout import Carry, collect_rollout, compute_advantages, episode_stats
from textenv import KeywordReward, RefLogprob, TextVectorEnv

PHASES = ["rollout: policy", "rollout: env", "rollout: reference", "rollout: reward", "rollout: other",
          "advantages", "update", "everything else"]  # fmt: skip
FLOOR = ["floor: generate", "floor: fwd+bwd"]


@dataclass
class Args:
    model: Literal["gpt2", "smollm2"] = "gpt2"
    """`gpt2`: a random GPT-2-architecture model of `--preset`'s shape; `smollm2`: not available yet"""
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
    """also time `agents.ppo.train` itself (fixed case, warmup + rounds iterations)"""
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


def build(args: Args) -> dict:
    """Tokenizer, model, the two cases and the floor's prompts."""
    if args.model != "gpt2":
        raise SystemExit(f"--model {args.model} is not available yet: it needs the real-LM loader of the SmolLM2 "
                         "issue (DESIGN.md, 'Data and models'); use --model gpt2 with --preset")
    from torch.utils.tensorboard import SummaryWriter

    device = torch.device(args.device)
    n_layer, n_embd, n_head, vocab = PRESETS[args.preset]
    tok, texts, source, fillers = tokenizer(vocab, args.texts)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=max(64, args.prompt_tokens + args.new_tokens),
                     n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    lm = GPT2LMHeadModel(cfg).to(device).eval()
    reference = copy.deepcopy(lm).eval().requires_grad_(False)
    P, N, E = args.prompt_tokens, args.new_tokens, args.batch
    base = rlhf_ppo(num_envs=E, num_steps=N + 1, num_minibatches=1, update_epochs=args.epochs, anneal_lr=False,
                    device=args.device, torch_threads=args.threads, save_every=0, eval_episodes=0, log_every=0)
    cases = {}
    for name, budget in (("fixed", N), ("realistic", (args.min_tokens, N))):
        reward, clocks = KeywordReward(["good", "great", "fun"]), {k: Clock(device) for k in PHASES[:4]}
        env = TextVectorEnv(E, tokenizer=tok, reward_model=clocks["rollout: reward"].wrap(reward), prompts=texts,
                            max_prompt_tokens=P, max_new_tokens=budget, min_new_tokens=N if name == "fixed" else args.min_tokens,
                            query_tokens=(P, P))  # fmt: skip
        env.step = clocks["rollout: env"].wrap(env.step)  # an instance attribute: the package is untouched
        envs = RefLogprob(env, reference, pad_token_id=tok.pad_token_id, device=device)
        envs.ref.logprobs = clocks["rollout: reference"].wrap(envs.ref.logprobs)
        agent = GPTAgent(copy.deepcopy(lm), tok.pad_token_id, vocab_size=len(tok), device=device, dtype=args.dtype)
        agent.get_action_and_value = clocks["rollout: policy"].wrap(agent.get_action_and_value)
        optimizer = torch.optim.Adam(agent.parameters(), lr=base.learning_rate, eps=1e-5,
                                     fused=device.type in ("cpu", "cuda"))  # as train() builds it
        kl_ctl = make_kl_controller(base.kl_controller, base.kl_coef, base.kl_target, base.kl_horizon)
        writer = SummaryWriter(tempfile.mkdtemp(prefix=f"ppo_iteration-{name}-"))
        cases[name] = Case(name, envs, agent, optimizer, base, Carry.start(envs, 1), kl_ctl, writer, clocks)
    first, _ = TextVectorEnv(E, tokenizer=tok, reward_model=KeywordReward(["good"]), prompts=texts,
                             max_prompt_tokens=P, max_new_tokens=N, query_tokens=(P, P)).reset(seed=0)
    prompts = torch.as_tensor(first[:, -P:]).to(device)
    assert (prompts != tok.pad_token_id).all(), "prompts must be exactly --prompt-tokens long"
    return {"tok": tok, "lm": cases["fixed"].agent.lm, "reference": reference, "cases": cases, "prompts": prompts,
            "texts_source": source, "fillers": fillers, "device": device, "ppo_args": base, "parameters": sum(p.numel() for p in lm.parameters())}


def run_iteration(case: Case) -> dict[str, float]:
    """One PPO iteration of `case` as `train` runs it; returns wall seconds per phase (PHASES) and `total`."""
    a, device = case.args, case.agent.device
    before = {k: c.seconds for k, c in case.clocks.items()}
    case.iteration += 1
    sync(device)
    t0 = time.perf_counter()
    rollout = collect_rollout(case.envs, case.agent, case.carry, a.num_steps, case.global_step, a.num_envs,
                              case.kl_ctl.coef, device)  # fmt: skip
    case.global_step += a.num_steps * a.num_envs
    sync(device)
    t1 = time.perf_counter()
    compute_advantages(rollout, case.agent, a.gamma, a.gae_lambda, a.bootstrap_truncated)
    sync(device)
    t2 = time.perf_counter()
    stats = ppo.update(case.agent, case.optimizer, rollout, a, a.clip_coef, distributed.SINGLE)
    sync(device)
    t3 = time.perf_counter()
    new_returns, kls, stats = episode_stats(rollout, stats, distributed.SINGLE)
    if kls:
        case.kl_ctl.update(float(np.mean(kls)), len(kls))
    ppo._log(case.writer, stats, None, case.iteration, case.global_step, rollout)  # train()'s TensorBoard logging
    sync(device)
    t4 = time.perf_counter()
    out = {k: c.seconds - before[k] for k, c in case.clocks.items()}
    out["rollout: env"] -= out["rollout: reward"]  # the env's step includes the reward call
    out["rollout: other"] = (t1 - t0) - sum(out[k] for k in PHASES[:4])
    out.update({"advantages": t2 - t1, "update": t3 - t2, "everything else": t4 - t3, "total": t4 - t0,
                "tokens": int(rollout.valid.sum())})
    return out


def run_floor(lm: GPT2LMHeadModel, prompts: torch.Tensor, reference: GPT2LMHeadModel, args: Args, pad: int) -> dict:
    """The compute floor: `generate` of the batch, then epochs x forward+backward of the 64 x 24 result."""
    device, P = prompts.device, prompts.shape[1]
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(device, args.dtype):
        ids = lm.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                          top_p=1.0, temperature=1.0, min_new_tokens=args.new_tokens,
                          max_new_tokens=args.new_tokens, pad_token_id=pad)  # fmt: skip  # (B, P + N)
    sync(device)
    t1 = time.perf_counter()
    for _ in range(args.epochs):
        with autocast(device, args.dtype):
            logits = lm(input_ids=ids).logits  # (B, P + N, V)
        logp = torch.log_softmax(logits[:, P - 1 : -1].float(), dim=-1)  # (B, N, V): the response positions
        loss = -logp.gather(-1, ids[:, P:, None]).mean()
        loss.backward()
    sync(device)
    t2 = time.perf_counter()
    with torch.no_grad(), autocast(device, args.dtype):
        reference(input_ids=ids).logits.float().log_softmax(-1)
    sync(device)
    t3 = time.perf_counter()
    lm.zero_grad(set_to_none=True)
    return {"floor: generate": t1 - t0, "floor: fwd+bwd": t2 - t1, "floor": t2 - t0, "ref fwd": t3 - t2}


class HookClock:
    """`train`'s `hooks`: the time between consecutive `on_iteration` calls (one whole iteration each)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_iteration(self, iteration, global_step, rollout, writer) -> None:
        self.times.append(time.perf_counter())


def train_check(built: dict, args: Args, iterations: int) -> list[float]:
    """Seconds per iteration of `agents.ppo.train` itself on a fresh fixed case (hook to hook)."""
    case = built["cases"]["fixed"]
    agent = GPTAgent(copy.deepcopy(built["lm"]), built["tok"].pad_token_id, vocab_size=len(built["tok"]),
                     device=built["device"], dtype=args.dtype)
    a = dataclasses.replace(case.args, total_timesteps=iterations * case.args.num_steps * case.args.num_envs,
                            run_dir=tempfile.mkdtemp(prefix="ppo_iteration-train-"))
    hooks = HookClock()
    ppo.train(a, envs=case.envs, agent=agent, hooks=hooks, dist=distributed.SINGLE)
    return list(np.diff(hooks.times))


def measure(built: dict, args: Args) -> dict:
    """Warm-up, then `rounds` rounds of fixed, realistic and floor; per-round records."""
    cases, pad = built["cases"], built["tok"].pad_token_id
    for case in cases.values():
        for _ in range(args.warmup):
            run_iteration(case)
    run_floor(built["lm"], built["prompts"], built["reference"], args, pad)
    rounds: dict[str, list[dict]] = {"fixed": [], "realistic": [], "floor": []}
    for r in range(args.rounds):
        order = ["fixed", "realistic", "floor"] if r % 2 == 0 else ["floor", "realistic", "fixed"]
        for name in order:
            if name == "floor":
                rounds[name].append(run_floor(built["lm"], built["prompts"], built["reference"], args, pad))
            else:
                rounds[name].append(run_iteration(cases[name]))
        print(f"round {r + 1}/{args.rounds}: fixed {rounds['fixed'][-1]['total']:.3f} s, realistic "
              f"{rounds['realistic'][-1]['total']:.3f} s, floor {rounds['floor'][-1]['floor']:.3f} s", flush=True)
    return rounds


def summarise(rounds: dict) -> dict:
    """Mean split (adds up to the mean total), median iteration and median per-round ratio to the floor."""
    floors = [f["floor"] for f in rounds["floor"]]
    out = {"floor": {"median_s": statistics.median(floors),
                     "mean_split_s": {k: statistics.mean(f[k] for f in rounds["floor"]) for k in FLOOR},
                     "median_floor_plus_ref_s": statistics.median(f["floor"] + f["ref fwd"] for f in rounds["floor"])}}
    for name in ("fixed", "realistic"):
        rs = rounds[name]
        split = {k: statistics.mean(x[k] for x in rs) for k in PHASES}
        out[name] = {"median_s": statistics.median(x["total"] for x in rs),
                     "mean_s": statistics.mean(x["total"] for x in rs),
                     "mean_split_s": split,
                     "tokens_per_iteration": statistics.mean(x["tokens"] for x in rs),
                     "ratio_to_floor": statistics.median(x["total"] / f["floor"] for x, f in zip(rs, rounds["floor"], strict=True)),
                     "ratio_to_floor_plus_ref": statistics.median(
                         x["total"] / (f["floor"] + f["ref fwd"]) for x, f in zip(rs, rounds["floor"], strict=True)),
                     "per_round": rs}  # fmt: skip
    return out


def main(args: Args) -> None:
    if args.quick:
        args.warmup, args.rounds = 1, 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    built = build(args)
    rounds = measure(built, args)
    s = summarise(rounds)
    fx, rl, fl = s["fixed"], s["realistic"], s["floor"]
    rows = []
    for k in PHASES:
        rows.append([k, fx["mean_split_s"][k], f"{100 * fx['mean_split_s'][k] / fx['mean_s']:.1f}%",
                     rl["mean_split_s"][k], f"{100 * rl['mean_split_s'][k] / rl['mean_s']:.1f}%"])
    rows += [["iteration (mean)", fx["mean_s"], "100%", rl["mean_s"], "100%"],
             ["iteration (median)", fx["median_s"], "", rl["median_s"], ""],
             ["tokens per iteration", fx["tokens_per_iteration"], "", rl["tokens_per_iteration"], ""]]
    for k in FLOOR:
        rows.append([k, fl["mean_split_s"][k], "", fl["mean_split_s"][k], ""])
    rows += [["floor (median)", fl["median_s"], "", fl["median_s"], ""],
             ["iteration / floor", fx["ratio_to_floor"], "", rl["ratio_to_floor"], ""],
             ["iteration / (floor + ref fwd)", fx["ratio_to_floor_plus_ref"], "", rl["ratio_to_floor_plus_ref"], ""]]
    lo, hi = args.min_tokens, args.new_tokens
    print_table(["phase (s)", f"fixed {hi}", "share", f"realistic {lo}-{hi}", "share"], rows)
    train_times = []
    if args.train_check:
        n = 3 if args.quick else args.warmup + args.rounds
        train_times = train_check(built, args, n)[1:]  # the first interval still warms up
        if train_times:
            print(f"agents.ppo.train, fixed case: {statistics.median(train_times):.3f} s per iteration (median of "
                  f"{len(train_times)}; phased loop above: {fx['median_s']:.3f} s)")
    targets = [target("iteration_over_floor_fixed", round(fx["ratio_to_floor"], 3), "<= 1.15", fx["ratio_to_floor"] <= 1.15),
               target("iteration_over_floor_realistic", round(rl["ratio_to_floor"], 3), "<= 1.25",
                      rl["ratio_to_floor"] <= 1.25)]  # fmt: skip
    if args.device.startswith("cuda") and args.preset == "gpt2-small":
        targets.append(target("gpt2_small_iteration_s", round(fx["median_s"], 3), "<= 3.0", fx["median_s"] <= 3.0))
    for t in targets:
        print(f"target {t['name']}: {t['value']} (want {t['target']}) -> {'met' if t['met'] else 'NOT met'}")
    n_layer, n_embd, n_head, _ = PRESETS[args.preset]
    results = {
        "model": {"preset": args.preset, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head,
                  "vocab": len(built["tok"]), "filler_tokens": built["fillers"], "parameters": built["parameters"]},
        "texts": built["texts_source"], "batch": args.batch, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "realistic_tokens": [args.min_tokens, args.new_tokens], "epochs": args.epochs,
        "num_steps": built["ppo_args"].num_steps, "device": args.device, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "warmup": args.warmup, "rounds": args.rounds,
        **s, "train_check_s_per_iteration": train_times,
    }  # fmt: skip
    print(f"wrote {write_result('ppo_iteration', results, targets, args.quick, args.out)}")


if __name__ == "__main__":
    main(tyro.cli(Args))
