"""The code's texture, held: no function over 60 lines or 8 parameters in the packages and benchmarks, and one PPO
iteration's file, agents/ppo.py, under 400 lines (STYLE: a reader follows one iteration without scrolling far)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("agents", "textenv", "benchmarks") for p in (ROOT / d).rglob("*.py"))


def functions():
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path.relative_to(ROOT), node


def test_no_function_over_60_lines_or_8_parameters():
    assert len(SOURCES) > 50
    long, wide = [], []
    for path, fn in functions():
        a = fn.args
        params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
        if fn.end_lineno - fn.lineno + 1 > 60:
            long.append(f"{path}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)")
        if len(params) > 8:
            wide.append(f"{path}:{fn.lineno} {fn.name} ({len(params)} parameters: a dataclass where values travel "
                        "together)")
    assert not long and not wide, long + wide


def test_the_ppo_loop_file_stays_short():
    lines = len((ROOT / "agents" / "ppo.py").read_text().splitlines())
    assert lines < 400, f"agents/ppo.py has {lines} lines: move a cohesive piece out (update.py, progress.py, run.py)"
