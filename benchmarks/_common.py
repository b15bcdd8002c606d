"""Shared pieces of the benchmark scripts: machine description and the JSON result file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
IMDB_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb"  # the real IMDb, beside the repo


def bench_texts(limit: int) -> tuple[list[str], str]:
    """Up to `limit` IMDb train reviews (a seeded sample, via textenv.build.data) when IMDb lies beside the repo,
    else the embedded corpus; and a line saying which."""
    from textenv.build.data import load_texts

    if IMDB_DIR.is_dir():
        texts = load_texts(IMDB_DIR, "train", limit=limit).texts
        return texts, f"IMDb train, {len(texts)} reviews (seeded sample)"
    texts = load_texts("embedded", "train").texts
    return texts, f"embedded corpus, {len(texts)} reviews (IMDb not found)"


def machine_info() -> dict:
    """What ran the benchmark: CPU model, usable cores, GPU (if any), torch version, date, commit."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
    }


def commit() -> str | None:
    """The checkout's commit (`git describe --always --dirty`: `-dirty` when files had uncommitted changes), or None
    outside a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=RESULTS_DIR.parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def target(name: str, value: float, target: str, met: bool) -> dict:
    """One row of the `targets` list."""
    return {"name": name, "value": value, "target": target, "met": bool(met)}


def final_quarter_kl(history: list[dict]) -> float:
    """Mean training KL over the last 25% of an RLHF run's iterations (`run(...)["history"]`): where a KL
    controller is judged against its setpoint."""
    kls = [h["kl"] for h in history if "kl" in h]
    tail = kls[-max(1, len(kls) // 4) :]
    return sum(tail) / len(tail) if tail else float("nan")


def write_result(name: str, results: dict, targets: list[dict], quick: bool, out: str | Path | None = None) -> Path:
    """Write `benchmarks/results/<name>.json` (or `out`) with the command that reproduces it."""
    suffix = "-gpu" if machine_info()["gpu"] else ""
    path = Path(out) if out else RESULTS_DIR / f"{name}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": machine_info(),
        "quick": quick,
        "results": results,
        "targets": targets,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def print_table(headers: list[str], rows: list[list]) -> None:
    """Print a plain aligned table."""
    cells = [[str(h) for h in headers]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
