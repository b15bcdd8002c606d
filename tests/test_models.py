"""Tokenizer, GPT pretraining, reward model, judge and the cached build, with tiny configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2LMHeadModel

from textenv.build.bpe import CLS, classifier_tokenizer, train_bpe
from textenv.build.corpus import corpus_split
from textenv.build.data import Texts
from textenv.build.judge import Judge, JudgeConfig, train_judge
from textenv.build.pipeline import Artifacts, TokenizerConfig, build, build_all, main, parse_args, preset
from textenv.build.pretrain import PretrainConfig, lr_at, pretrain
from textenv.build.reward_train import RewardConfig, encode, train_reward
from textenv.rewards import HFRewardModel
from tiny import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # on shared, busy cores more threads are several times slower

TRAIN = corpus_split("train")
TEST = corpus_split("test")


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TRAIN.texts[:3000], vocab_size=512)


def _tiny_gpt(**kw) -> PretrainConfig:
    base = dict(model="tiny", block_size=32, batch_size=16, max_steps=40, warmup_steps=5, lr=3e-3, eval_every=20,
                eval_windows=32, log_every=10, save_every=0, n_samples=2, tensorboard=False)
    return PretrainConfig(**(base | kw))


def _tiny_rm(**kw) -> RewardConfig:
    base = dict(vocab_size=512, dim=64, n_layers=1, n_heads=2, hidden_dim=128, max_length=48, lr=2e-3, batch_size=32,
                epochs=2.0, dropout=0.0)
    return RewardConfig(**(base | kw))


def test_tokenizer_round_trip_and_specials(tok, tmp_path: Path) -> None:
    for s in ["The film was wonderful.", "  two  spaces, é, 😀 and\ttabs\n", "Zyxq unseen wordz!"]:
        assert tok.decode(tok(s)["input_ids"]) == s
    assert len(tok) == 512 and tok.eos_token == "<|endoftext|>" and tok.pad_token == "<pad>"
    assert tok.eos_token_id != tok.pad_token_id
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("I loved it.")["input_ids"] == tok("I loved it.")["input_ids"] and again.pad_token_id == tok.pad_token_id
    cls = classifier_tokenizer(tok, max_length=16)
    enc = cls(["good", "a much longer text here"], padding=True, truncation=True)
    assert set(enc) == {"input_ids", "attention_mask"}  # DistilBERT takes no token_type_ids
    assert enc["input_ids"][0][0] == tok.convert_tokens_to_ids(CLS) and enc["attention_mask"][0][-1] == 0
    assert tok("good")["input_ids"][0] != tok.convert_tokens_to_ids(CLS)  # the LM tokenizer adds nothing
    with pytest.raises(ValueError, match="at least 260"):
        train_bpe(["x"], vocab_size=100)


def test_lr_schedule() -> None:
    cfg = PretrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(20, cfg, time_frac=0.5) == pytest.approx(0.55)  # a time budget half used: half way down


def test_pretrain_loss_falls_and_save_load_round_trip(tok, tmp_path: Path) -> None:
    m = pretrain(_tiny_gpt(), TRAIN.texts[:1500], TEST.texts[:200], tmp_path, tokenizer=tok, log=lambda s: None)
    first, last = m["history"][0]["heldout_loss"], m["history"][-1]["heldout_loss"]
    assert last < first - 0.3 and m["heldout_loss"] < torch.log(torch.tensor(512.0)).item() - 1.5
    assert m["heldout_perplexity"] < m["unigram_perplexity"] and len(m["samples"]) == 2
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "checkpoint").exists()
    model = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = tok(["The film was", "I hated"], return_tensors="pt", padding=True)["input_ids"]
    sd = load_file(str(tmp_path / "model.safetensors"))
    fresh = GPT2LMHeadModel(model.config).eval()
    fresh.load_state_dict(sd, strict=False)
    fresh.tie_weights()
    with torch.no_grad():
        assert torch.equal(model(x).logits, fresh(x).logits)
    assert AutoTokenizer.from_pretrained(tmp_path)("hi")["input_ids"] == tok("hi")["input_ids"]


def test_pretrain_resume_matches_uninterrupted_run(tok, tmp_path: Path) -> None:
    cfg = _tiny_gpt(max_steps=20, save_every=10, log_every=5, eval_every=100)
    pretrain(cfg, TRAIN.texts[:600], TEST.texts[:100], tmp_path / "a", tokenizer=tok, log=lambda s: None)

    def interrupt(line: str) -> None:
        if line.startswith("step 15/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, TRAIN.texts[:600], TEST.texts[:100], tmp_path / "b", tokenizer=tok, log=interrupt)
    assert (tmp_path / "b" / "checkpoint" / "state.pt").exists()
    lines: list[str] = []
    pretrain(cfg, TRAIN.texts[:600], TEST.texts[:100], tmp_path / "b", tokenizer=tok, log=lines.append)
    assert any("resumed" in s and "step 10" in s for s in lines)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_by_name_from_local_dir(tok, tmp_path: Path) -> None:
    pretrain(_tiny_gpt(max_steps=5), TRAIN.texts[:300], TEST.texts[:100], tmp_path / "base", tokenizer=tok,
             log=lambda s: None)
    m = pretrain(_tiny_gpt(model=str(tmp_path / "base"), max_steps=5, lr=1e-4), TRAIN.texts[:300], TEST.texts[:100],
                 tmp_path / "tuned", log=lambda s: None)  # no tokenizer passed: loaded from the folder
    assert m["steps"] == 5 and (tmp_path / "tuned" / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="needs a tokenizer"):
        pretrain(_tiny_gpt(), TRAIN.texts[:100], TEST.texts[:50], tmp_path / "x")


def test_head_tail_truncation(tok) -> None:
    cls = classifier_tokenizer(tok)
    text = " ".join(f"w{i}" for i in range(200))
    (ids,) = encode(cls, [text], max_length=21, head_fraction=0.5)
    full = tok(text)["input_ids"]
    assert len(ids) == 21 and ids[0] == cls.cls_token_id and ids[1:11] == full[:10] and ids[11:] == full[-10:]


@pytest.mark.slow
def test_reward_model_separates_and_round_trips(tmp_path: Path) -> None:
    m = train_reward(_tiny_rm(), TRAIN.head(3000), TEST.head(300), tmp_path / "rm", log=lambda s: None)
    assert m["test_accuracy"] > 0.9
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert model.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"} and type(model).__name__.startswith("DistilBert")
    texts = ["The acting was wonderful and the story moved me.", "The plot was dull and lifeless; avoid it."]
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    with torch.no_grad():
        logits = model(**tok(texts, return_tensors="pt", padding=True)).logits
    assert logits[0, 1] - logits[0, 0] > 0 > logits[1, 1] - logits[1, 0]
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        assert torch.equal(again(**tok(texts, return_tensors="pt", padding=True)).logits, logits)
    scores = HFRewardModel.from_pretrained(str(tmp_path / "rm"))(texts)
    assert scores == pytest.approx(logits[:, 1].tolist(), abs=1e-5)
    # "by name": the same folder fine-tuned through the from_pretrained path with the seed-recipe settings
    cfg = dataclasses.replace(RewardConfig.seed_recipe(str(tmp_path / "rm")), epochs=0.1, max_length=40)
    m2 = train_reward(cfg, TRAIN.head(200), TEST.head(100), tmp_path / "rm2", log=lambda s: None)
    assert m2["steps"] == 2 and m2["test_accuracy"] > 0.85


def test_judge_learns_and_round_trips(tmp_path: Path) -> None:
    judge = train_judge(JudgeConfig(epochs=2, n_features=2**14), TRAIN.head(2000), TEST.head(300), tmp_path,
                        log=lambda s: None)
    assert judge.metrics["test_accuracy"] > 0.9
    again = Judge.load(tmp_path)
    texts = ["Wonderful acting, I loved it!", "Boring and awful, avoid it."]
    assert again(texts) == judge(texts) and judge(texts)[0] > 0.5 > judge(texts)[1]
    assert again.cfg == judge.cfg and again.metrics == judge.metrics
    with pytest.raises(FileNotFoundError, match="holds no judge"):
        Judge.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="labelled"):
        train_judge(JudgeConfig(), Texts(["a"]), TEST.head(5))


def test_judge_features_do_not_depend_on_the_string_hash_seed() -> None:
    # a set of strings iterates in the order of Python's per-process string hash (PYTHONHASHSEED), and the order of
    # a text's buckets is the order of the judge's float sum: a fixed (sorted) order gives every process one score
    ids, offsets, _ = Judge().features(["a truly great film, great fun and a great cast!", "dull, dull and dull"])
    rows = [ids[a:b].tolist() for a, b in zip(offsets.tolist(), offsets.tolist()[1:] + [len(ids)], strict=True)]
    assert len(rows[0]) > 10 and all(row == sorted(set(row)) for row in rows)


@pytest.mark.slow
def test_build_all_caches_and_loads(tmp_path: Path) -> None:
    args = preset("embedded", out_dir=str(tmp_path), train_limit=800, test_limit=100,
                  tokenizer=TokenizerConfig(vocab_size=400), gpt=_tiny_gpt(max_steps=10, block_size=32),
                  reward=_tiny_rm(epochs=1.0), judge=JudgeConfig(epochs=1, n_features=2**12))
    lines: list[str] = []
    paths = build_all(args, log=lines.append)
    assert all(isinstance(p, Path) and (p / "build.json").exists() for p in (paths.tokenizer, paths.gpt,
                                                                               paths.reward, paths.judge))
    assert not any("reusing" in s for s in lines)
    lines.clear()
    again = build_all(args, log=lines.append)
    assert again == paths and sum("reusing" in s for s in lines) == 4
    # a build killed before its marker: the folder holds half a model and no build.json; the next run rebuilds it
    (paths.judge / "build.json").unlink()
    (paths.judge / "half-written.bin").write_bytes(b"\0" * 10)
    lines.clear()
    assert build_all(args, log=lines.append).judge == paths.judge
    assert any(s.startswith("[judge] building") for s in lines) and sum("reusing" in s for s in lines) == 3
    assert (paths.judge / "build.json").exists() and not list(paths.judge.glob("*.tmp"))
    changed = build_all(dataclasses.replace(args, judge=JudgeConfig(epochs=2, n_features=2**12)), log=lines.append)
    assert changed.judge != paths.judge and changed.reward == paths.reward
    model, tok = paths.load_gpt()
    assert model.config.vocab_size == len(tok) == 400
    assert 0.0 <= paths.load_judge()(["great"])[0] <= 1.0
    assert set(paths.metrics()) == {"tokenizer", "gpt", "reward", "judge"}
    assert Artifacts().metrics() == {} and set(Artifacts(judge=paths.judge).metrics()) == {"judge"}


def test_cli_parses_presets_and_builds_a_step(tmp_path: Path) -> None:
    paths = main(["tokenizer", "--out-dir", str(tmp_path), "--tokenizer.vocab-size", "300", "--train-limit", "200"])
    assert paths.tokenizer is not None and len(AutoTokenizer.from_pretrained(paths.tokenizer)) == 300
    assert paths.gpt is None
    assert (preset().data_dir, preset().gpt.model, preset().tokenizer.vocab_size) == ("embedded", "mini", 1024)
    assert (preset("imdb").gpt.model, preset("imdb").reward.model, preset("imdb").reward.max_length) == ("small", "minilm", 128)
    assert preset("imdb", data_dir="/d").data_dir == "/d"
    assert parse_args([]) == parse_args(["all", "embedded"]) == ("all", preset())
    assert parse_args(["imdb"]) == ("all", preset("imdb"))
    for argv in (["reward", "imdb", "--data-dir", "/data/imdb"], ["reward", "imdb", "--data-dir=/data/imdb"]):
        step, args = parse_args(argv)
        assert (step, args.data_dir, args.gpt.model) == ("reward", "/data/imdb", "small")
    step, args = parse_args(["--gpt.max-steps", "7"])  # no preset named: the default one
    assert (step, args.gpt.max_steps, args.gpt.model) == ("all", 7, "mini")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")


def test_cli_user_error_prints_one_line(tmp_path: Path, capsys) -> None:
    # `python -m textenv.build ...` in this process, through its `main`
    with pytest.raises(SystemExit) as exit_:
        main(["tokenizer", "--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exit_.value.code == 2 and len(errors) == 1 and "nowhere does not exist" in errors[0], err[-2000:]
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_auto_threads_are_decided_once_per_process(monkeypatch):
    """A busy machine gets 1 thread; the decision is not revisited when the process's own build has raised the load
    average (which used to drop the RLHF phase after a build to 1 thread on a free machine)."""
    import agents.vector
    from textenv.build import pipeline

    monkeypatch.setattr(agents.vector, "_AUTO_THREADS", None)
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    torch.set_num_threads(2)
    assert pipeline.set_threads(None) == 2
    monkeypatch.setattr("os.getloadavg", lambda: (64.0, 64.0, 64.0))  # our own build's load, later
    assert pipeline.set_threads(None) == 2
    assert pipeline.set_threads(1) == 1 and pipeline.set_threads(None) == 2  # explicit counts still apply
    monkeypatch.setattr(agents.vector, "_AUTO_THREADS", None)  # a fresh process that starts on a busy machine
    assert pipeline.set_threads(None) == 1


def saved_llama(tok, folder: Path, layers: int, **config):
    """`tiny_llama` over `tok`'s vocabulary, saved with `tok` into `folder`."""
    model = tiny_llama(len(tok), layers, **config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def test_warm_start_trains_only_the_top_blocks_and_lowers_the_held_out_loss(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from textenv import char_tokenizer
    from textenv.build.warm_start import WarmStartConfig, warm_start

    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz .")
    base = saved_llama(tok, tmp_path / "base", layers=3, tie_word_embeddings=True)
    texts = [f"the film was {w} and the cast was {w}. " * 3 for w in ("good", "bad", "fine", "dull")] * 20
    cfg = WarmStartConfig(trainable_layers=1, window=24, max_texts=80, eval_texts=8, batch_size=8, lr=1e-2,
                          epochs=3.0, max_minutes=None)
    m = warm_start(cfg, tmp_path / "base", texts, texts[:8], tmp_path / "warm", log=lambda s: None)
    assert m["heldout_loss_after"] < m["heldout_loss_before"] - 0.5 and m["steps"] == 30
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "warm")
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed and all(k.startswith(("model.layers.2.", "model.norm.")) for k in changed), changed


def test_warm_start_is_fixed_by_work_and_its_time_guard_cuts_loudly(tmp_path: Path) -> None:
    from textenv import char_tokenizer
    from textenv.build.warm_start import WarmStartConfig, warm_start

    assert WarmStartConfig().max_minutes is None  # by default the steps alone decide: same seed, same model
    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz .")
    saved_llama(tok, tmp_path / "base", layers=2)
    texts = [f"the film was {w} and the cast was {w}. " * 3 for w in ("good", "bad")] * 20
    logs: list[str] = []
    cfg = WarmStartConfig(trainable_layers=1, window=24, max_texts=40, eval_texts=4, batch_size=8, max_minutes=0.0)
    m = warm_start(cfg, tmp_path / "base", texts, texts[:4], tmp_path / "cut", log=logs.append)
    assert (m["steps"], m["planned_steps"], m["cut_by_time"]) == (1, 5, True)
    assert any(line.startswith("WARNING: warm start cut at step 1 of 5") for line in logs), logs
    full = warm_start(dataclasses.replace(cfg, max_minutes=None), tmp_path / "base", texts, texts[:4],
                      tmp_path / "full", log=logs.append)
    assert (full["steps"], full["cut_by_time"]) == (5, False)


def test_warm_start_step_is_built_once_and_reused(tmp_path: Path) -> None:
    # `textenv.build warmstart` on a stand-in for the fetched SmolLM2 (a tiny Llama in its cache folder)
    import json

    from textenv import char_tokenizer
    from textenv.build.smollm2 import FOLDER, MARKER, VERSION
    from textenv.build.warm_start import WarmStartConfig

    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz .,'!")
    saved_llama(tok, tmp_path / FOLDER, layers=2)
    (tmp_path / FOLDER / MARKER).write_text(json.dumps({"version": VERSION}))
    args = preset("embedded", out_dir=str(tmp_path), train_limit=200, test_limit=40,
                  warm_start=WarmStartConfig(trainable_layers=1, window=16, max_texts=64, eval_texts=8, batch_size=8))
    logs: list[str] = []
    first = build(args, "warmstart", log=logs.append).warm_start
    record = json.loads((first / "build.json").read_text())
    assert first.name.startswith("warmstart-") and record["metrics"]["rows"] == 64
    assert record["metrics"]["heldout_loss_after"] < record["metrics"]["heldout_loss_before"]
    assert build(args, "warmstart", log=logs.append).warm_start == first and any("reusing" in s for s in logs)
