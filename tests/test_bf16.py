"""The RLHF job's bf16 path (`--dtype bf16`: GPTAgent under torch.autocast, float32 master weights and
log-probs) run on CPU, since no GPU has run it: GPTAgent, its KV cache, RefLogprob, the frozen trunk
(`trainable_layers`) and the report, all reached through `agents.rlhf.run` as on a GPU.

Two runs of 2 PPO iterations with the embedded preset's PPO shapes (RLOO, 4 episodes per prompt, normalised
reward, PID KL controller): a tiny GPT-2 with every parameter trained, and a tiny Llama with its top block
trained over a frozen trunk. Every `update` is wrapped (`agents.ppo.update`) and checked:
- the log-probs the rollout stored (KV-cached one-token steps) equal the update's bf16 recompute of the same
  sequences (`evaluate_sequences`, what `score_minibatch` calls) within LOGPROB_ATOL, and the ratio at the
  first minibatch of the first epoch (`debug/first_ratio_max_dev`) is 1 within that bound;
- bf16 is really on: that recompute differs from a float32 one, by at most BF16_VS_FP32;
- log-probs, entropies and values are float32; after each update every parameter, gradient and Adam state
  tensor is float32; the frozen trunk does not move and the update recomputes none of its rows;
- at the first rollout (policy = reference) RefLogprob's float32 log-probs equal the float32 recompute, and
  the bf16 policy's are within BF16_VS_FP32 of them;
- report.json records bf16 and finite before/after numbers.
Also: the KV cache under autocast keeps keys and values each in its own dtype (Llama: float32 keys after the
rotary embedding, bf16 values), and `distributed.setup` on CUDA gives CPU tensors a backend (run on CPU).
"""

import copy
import json
import math

import pytest
import torch
import torch.distributed as tdist
from torch.distributed.distributed_c10d import Backend, BackendConfig
from transformers import GPT2LMHeadModel, LlamaForCausalLM

import agents.ppo
from agents import distributed
from agents.rlhf import Pieces, run
from textenv import KeywordReward, char_tokenizer
from textenv.lm import CachedLM, forward_full
from tiny import PROMPTS, tiny_gpt, tiny_llama, toy_config

# bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3). Rounding every activation (bf16 against
# float32) moves these models' log-probs by up to ~7e-3 nats (measured). The rollout's one-token steps and the
# update's whole-row forward run the same bf16 ops on the same bf16 keys and values, with float32 logits: they
# can part only where a kernel of another shape sums in another order and flips a rounding, a small fraction
# of that, hence 1e-3 nats (a ratio within 1 +- 1e-3). On CPU they agree exactly (0.0). A position off by one
# in the cached step moves them by 1e-2 (Llama) to 1.7 nats (GPT-2).
LOGPROB_ATOL = 1e-3
# bf16 against float32 over the same weights: measured <= 7e-3 nats; at least 1e-5, float32's own noise
# between two paths (2e-7 measured), so that autocast is shown to be on.
BF16_VS_FP32 = (1e-5, 0.02)
INIT_STD = 0.1  # peaked enough next-token distributions that a misplaced token or position shows
# 8 episodes in groups of 4, often identical responses: too few for the 2-standard-error test of the
# negative-KL warning (agents.rollout), which then fires on noise (float32 runs this size measure < 0 too)
FEW_EPISODES = pytest.mark.filterwarnings(
    r"ignore:iteration \d+. measured KL to the reference is negative:UserWarning")


def peaked_gpt2(vocab: int) -> GPT2LMHeadModel:
    """`tiny_gpt` (one 16-wide GPT-2 block: absolute positions, LayerNorm, tied head) initialised at INIT_STD."""
    return tiny_gpt(vocab, initializer_range=INIT_STD)


def peaked_llama(vocab: int) -> LlamaForCausalLM:
    """`tiny_llama` (two 32-wide blocks: grouped-query attention, rotary positions, RMSNorm) at INIT_STD."""
    return tiny_llama(vocab, 2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                      initializer_range=INIT_STD)


class UpdateProbe:
    """Stands in for `agents.ppo.update`: measures the rollout against bf16 and float32 recomputes before the
    real update, and the dtypes of the weights, gradients and Adam's state after it; one record per update."""

    def __init__(self, update):
        self.update, self.records = update, []

    def __call__(self, agent, optimizer, rollout, *args, **kwargs):
        valid, trunk = rollout.valid, agent.split.trunk if agent.split is not None else None
        recomputed = trunk.recomputed if trunk is not None else 0
        with torch.no_grad():
            bf16 = agent.evaluate_sequences(rollout.obs, rollout.actions, valid)
            one_step = agent.get_action_and_value(rollout.obs[0], rollout.actions[0])[1:]  # uncached forward
            agent.autocast_dtype = None  # the same weights in float32
            try:
                fp32 = agent.evaluate_sequences(rollout.obs, rollout.actions, valid)[0]
            finally:
                agent.autocast_dtype = torch.bfloat16
        gap = lambda a, b: float((a - b)[valid].abs().max())  # noqa: E731
        rec = {"cached_vs_bf16": gap(rollout.logprobs, bf16[0]), "bf16_vs_fp32": gap(bf16[0], fp32),
               "policy_vs_ref": gap(rollout.logprobs, rollout.ref_logprobs),
               "ref_vs_fp32": gap(rollout.ref_logprobs, fp32),
               "out_dtypes": {x.dtype for x in (*bf16, *one_step)},
               "trunk_recomputed": trunk.recomputed - recomputed if trunk is not None else 0}
        stats = self.update(agent, optimizer, rollout, *args, **kwargs)
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        grads = [p.grad for p in agent.parameters() if p.grad is not None]
        rec.update(first_ratio=stats["debug/first_ratio_max_dev"], n_state=len(state), n_grads=len(grads),
                   dtypes={t.dtype for t in [*agent.parameters(), *grads, *state]})
        self.records.append(rec)
        return stats


def bf16_run(tmp_path, monkeypatch, policy, trainable_layers):
    """Two PPO iterations of `agents.rlhf.run` in bf16 on CPU, the embedded preset's PPO shapes on 8 envs,
    `update` watched by an `UpdateProbe`; returns (report record, probe)."""
    probe = UpdateProbe(agents.ppo.update)
    monkeypatch.setattr(agents.ppo, "update", probe)
    ppo = dict(device="cpu", num_envs=8, num_steps=8, total_timesteps=8 * 8 * 2, num_minibatches=4,
               advantages="rloo", kl_coef=0.2, kl_target=1.5, save_every=0)
    cfg = toy_config(tmp_path, ppo=ppo, dtype="bf16", trainable_layers=trainable_layers, group_size=4,
                     normalize_reward=True, best_of_n_prompts=0)
    tok = char_tokenizer("ab ")
    pieces = Pieces(tokenizer=tok, policy=policy, reward_fn=KeywordReward("a"), train_prompts=PROMPTS,
                    eval_prompts=PROMPTS * 2)
    return run(cfg, pieces), probe


def check_updates(probe: UpdateProbe) -> None:
    assert len(probe.records) == 2
    for i, rec in enumerate(probe.records):
        assert rec["cached_vs_bf16"] <= LOGPROB_ATOL and rec["first_ratio"] <= LOGPROB_ATOL, (i, rec)
        assert BF16_VS_FP32[0] < rec["bf16_vs_fp32"] <= BF16_VS_FP32[1], (i, rec)
        assert rec["out_dtypes"] == {torch.float32}, (i, rec)
        assert rec["dtypes"] == {torch.float32} and rec["n_grads"] > 0 and rec["n_state"] > 0, (i, rec)
        assert rec["trunk_recomputed"] == 0, (i, rec)  # the update reads the rollout's trunk outputs
    first = probe.records[0]  # before any step the policy is the reference
    assert first["ref_vs_fp32"] <= 1e-5 and first["policy_vs_ref"] <= BF16_VS_FP32[1], first


def check_report(rec: dict, run_dir) -> None:
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved["timing"]["dtype"] == rec["timing"]["dtype"] == "bf16"
    for side in ("before", "after"):
        for key in ("reward_mean", "kl_mean", "ref_perplexity", "distinct_2"):
            assert math.isfinite(saved[side][key]), (side, key, saved[side][key])
    assert saved["before"]["kl_mean"] == 0.0 and len(saved["history"]) == 2


@FEW_EPISODES
def test_rlhf_job_in_bf16_with_a_gpt2_policy(tmp_path, monkeypatch):
    policy = peaked_gpt2(len(char_tokenizer("ab ")))
    start = copy.deepcopy(policy.state_dict())
    rec, probe = bf16_run(tmp_path, monkeypatch, policy, trainable_layers=None)
    check_updates(probe)
    check_report(rec, tmp_path / "run")
    trained = policy.state_dict()
    assert all(v.dtype == torch.float32 for v in trained.values())
    key = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(trained[key], start[key])


@FEW_EPISODES
def test_rlhf_job_in_bf16_with_a_llama_policy_over_a_frozen_trunk(tmp_path, monkeypatch):
    policy = peaked_llama(len(char_tokenizer("ab ")))
    start = copy.deepcopy(policy.state_dict())
    rec, probe = bf16_run(tmp_path, monkeypatch, policy, trainable_layers=1)
    check_updates(probe)
    check_report(rec, tmp_path / "run")
    moved = {k for k, v in policy.state_dict().items() if not torch.equal(v, start[k])}
    assert moved and all(k.startswith(("model.layers.1.", "model.norm.")) for k in moved), moved


@pytest.mark.parametrize("make", [peaked_llama, peaked_gpt2])
def test_kv_cache_under_autocast_keeps_each_tensor_in_its_dtype_and_equals_a_full_forward(make):
    model = make(12).eval()
    obs = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8], [0, 9, 10, 11]])
    cache = CachedLM(model, 0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for token in (3, 7, 2, 5):
            logits = cache.step(obs)[0]
            full = forward_full(model, obs, 0)[0][:, -1]
            # the same bf16 ops on the same keys and values (see LOGPROB_ATOL); 0.0 measured
            torch.testing.assert_close(logits, full, atol=LOGPROB_ATOL, rtol=0)
            obs = torch.cat([obs[:, 1:], torch.full((3, 1), token)], dim=1)
    assert logits.dtype == torch.float32
    assert cache.values[0].dtype == torch.bfloat16  # a linear layer's output
    # Llama's rotary embedding multiplies the bf16 keys by float32 cos/sin: float32 keys beside bf16 values
    assert cache.keys[0].dtype == (torch.float32 if make is peaked_llama else torch.bfloat16)


@pytest.mark.parametrize("device, cuda_backend", [("cuda", "nccl"), ("cpu", "gloo")])
def test_torchrun_process_group_has_a_backend_for_cpu_tensors(monkeypatch, device, cuda_backend):
    # PPO all-reduces its loss statistics as a CPU tensor, which NCCL (CUDA tensors only) cannot carry: the
    # CUDA branch of `setup`, run on CPU with torch.distributed's calls stubbed.
    calls = {}
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda backend, **kw: calls.update(backend=backend))
    monkeypatch.setattr(tdist, "get_rank", lambda: 1)
    monkeypatch.setattr(tdist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.update(device=str(d)))
    d, got = distributed.setup(device)
    assert (d.rank, d.world_size, got, calls.get("device")) == ((1, 2, "cuda:1", "cuda:1") if device == "cuda"
                                                                else (1, 2, "cpu", None))
    backends = BackendConfig(Backend(calls["backend"])).get_device_backend_map()
    assert (str(backends.get("cpu")), str(backends.get("cuda"))) == ("gloo", cuda_backend)
