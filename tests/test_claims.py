"""The docs' claims against what backs them: each number in the README's results table against the JSON files the
row links, and every `--flag` that README.md, docs/*.md and benchmarks/README.md name against the CLI it belongs to
(parsers built in-process from each CLI's own tyro or argparse definition)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# --- the README's results table ------------------------------------------------------------------------------------


def results_rows() -> dict[str, str]:
    """The README's results table (the one headed `| what was measured | headline |`): {first cell: the row}."""
    table = ROOT.joinpath("README.md").read_text().split("\n| what was measured | headline |\n", 1)[1]
    rows = []
    for line in table.splitlines()[1:]:  # under the |---|---| line, up to the table's end
        if not line.startswith("| "):
            break
        rows.append(line)
    return {row.split(" | ", 1)[0].lstrip("| ").strip(): row for row in rows}


def load(name: str) -> dict:
    """`results` of a committed benchmark JSON (`benchmarks/results/<name>.json`)."""
    return json.loads((RESULTS / f"{name}.json").read_text())["results"]


def f2(x: float) -> str:
    return f"{x:.2f}"


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def span(values: list[float], fmt: Callable[[float], str]) -> str:
    """`lo-hi` of the values, each formatted (`%` once, at the end); one value when both read the same."""
    lo, hi = fmt(min(values)), fmt(max(values))
    return hi if lo == hi else f"{lo.rstrip('%')}-{hi}"


def reading(folder: str) -> dict[str, dict[str, float]]:
    """A blind reading's shares, as `blind_reading.py score` computes them from the labels and the key."""
    path = RESULTS / "blind_reading" / folder
    key = json.loads((path / "key.json").read_text())
    counts: dict[str, dict[str, float]] = {"before": {}, "after": {}}
    for line in (path / "labels.tsv").read_text().splitlines():
        if not line.strip():
            continue
        k, sentiment, on_topic, fluent = line.strip().split("\t")
        c = counts[key[k][0]]
        for name, hit in (("n", True), ("positive", sentiment == "pos"), ("on_topic", on_topic == "y"),
                          ("fluent", fluent == "y"), ("all_three", (sentiment, on_topic, fluent) == ("pos", "y", "y"))):
            c[name] = c.get(name, 0) + hit
    return {side: {k: v / c["n"] for k, v in c.items() if k != "n"} for side, c in counts.items()}


def kl_error(tail: float, setpoint: float) -> float:
    return (tail - setpoint) / setpoint


def signed_pct(x: float) -> str:
    return f"{100 * x:+.0f}%"


def cartpole() -> list[str]:
    out = []
    for name in ("cartpole", "cartpole_zoo_rerun"):
        ours, sb3 = load(name)["ours (zoo)"], load(name)["SB3 (zoo)"]
        out += [f2(ours["median_steps_to_solve"] / sb3["median_steps_to_solve"]) + "x",
                f2(ours["median_sps"] / sb3["median_sps"]) + "x"]
    return out


def rollout() -> list[str]:
    r = load("rollout")["scenarios"]["realistic"]
    return [f2(r["ratio_vs_generate"]["wall"]) + "x", f"{r['ratio_vs_naive']['wall']:.1f}x"]


def ppo_iteration() -> list[str]:
    r = load("ppo_iteration")
    return [f2(r["fixed"]["ratio_to_floor"]) + "x", f2(r["realistic"]["ratio_to_floor"]) + "x"]


def env_overhead() -> list[str]:
    r = load("env_overhead")
    return [f"{100 * r['batched_rule']['fraction_of_gpt_decode_step']:.1f}%"]


def reward_models() -> list[str]:
    m = load("reward_models")["models"]
    out = [f"{m['minilm']['build_seconds'] / 60:.1f} minutes"]
    for name in ("minilm", "scratch"):
        rates = m[name]["rates"]
        out += [f"{100 * rates['whole']['accuracy']:.1f}%", f"{100 * rates['20_words']['accuracy']:.1f}%",
                pct(rates["20_words"]["positive_rate_of_negative"])]
    return out


def rlhf_embedded() -> list[str]:
    runs = [load("rlhf_embedded"), load("rlhf_embedded_seed2")]
    gains = " and ".join(f"{r['gain']['reward_mean']:+.2f}" for r in runs)
    judges = " and ".join(f"{f2(r['before']['positive_rate_judge'])} -> {f2(r['after']['positive_rate_judge'])}"
                          for r in runs)
    ppl = [r["after"]["ref_perplexity"] / r["before"]["ref_perplexity"] for r in runs]
    times = " and ".join(f"{r['timing']['total_s']:.0f} s" for r in runs)
    return [f"reward {gains}", f"judge {judges}", span(ppl, f2) + "x", times]


def rlhf_imdb() -> list[str]:
    r = load("rlhf_imdb")
    return [f"{r['gain']['reward_mean']:+.2f}",
            f"{f2(r['before']['positive_rate_judge'])} -> {f2(r['after']['positive_rate_judge'])}"]


def rlhf_smollm2() -> list[str]:
    runs = [load("rlhf_smollm2_nrw4"), load("rlhf_smollm2_nrw4_seed2"), load("rlhf_smollm2_nrw4_seed3")]
    reads = [reading("smollm2_nrw4_seed1"), reading("smollm2_nrw4_seed2"), reading("smollm2_nrw4_seed3")]
    minutes = [f"{r['timing']['total_s'] / 60:.1f}" for r in runs]
    after = {k: span([r["after"][k] for r in reads], pct) for k in ("positive", "on_topic", "fluent", "all_three")}
    return [f"{after['positive']} positive", f"{after['on_topic']} on-topic", f"{after['fluent']} fluent",
            f"{after['all_three']} all three", "the start: " + span([r["before"]["all_three"] for r in reads], pct),
            span([r["before"]["positive_rate_judge"] for r in runs], f2) + " -> "
            + span([r["after"]["positive_rate_judge"] for r in runs], f2),
            "KL " + span([r["after"]["kl_mean"] for r in runs], lambda x: f"{x:.1f}"),
            span([r["after"]["distinct_2"] / r["real_reviews"]["distinct_2"] for r in runs], f2) + "x",
            ", ".join(minutes[:-1]) + " and " + minutes[-1] + " minutes"]


def kl_control() -> list[str]:
    errors, setpoints = [], []
    for name in ("overoptimisation", "overoptimisation_smollm2"):  # every run at a setpoint, each seed apart
        for p in load(name)["points"]:
            if p["setpoint"] is not None:
                errors.append(kl_error(p["train_kl_final_quarter"], p["setpoint"]))
                setpoints.append(p["setpoint"])
    for name in ("rlhf_imdb", "rlhf_smollm2_log_pid", "rlhf_smollm2", "rlhf_smollm2_seed2", "rlhf_embedded",
                 "rlhf_embedded_seed2"):
        r = load(name)
        errors.append(kl_error(r["kl_final_quarter"], r["config"]["ppo"]["kl_target"]))
        setpoints.append(r["config"]["ppo"]["kl_target"])
    return [f"{signed_pct(min(errors))} to {signed_pct(max(errors))}", f"setpoints {min(setpoints):g} to {max(setpoints):g}"]


def overoptimisation() -> list[str]:
    r = load("overoptimisation")
    judge = {m["setpoint"]: m["judge"] for m in r["means"]}
    return [f"judge {f2(r['before']['judge_mean'])} -> {f2(judge[1.0])} at 1 nat", f"{f2(judge[None])} unpenalised"]


def tools() -> list[str]:
    out = []
    for task in ("calculator", "guessing"):
        seeds = load("tools")[task]
        before = sum(s["before"] for s in seeds) / len(seeds)
        out.append(f"{task} {f2(before)} -> {span([s['after'] for s in seeds], f2)}")
    return out


def determinism() -> list[str]:
    r = load("determinism")
    assert r["repeat_identical"]
    return ["identical", f2(r["max_gap_across_threads"]["gain"])]


def scaling() -> list[str]:
    return [f2(load("scaling")["runs"]["textenv_x2"]["speedup"]) + "x"]


def sharding_memory() -> list[str]:
    r = load("sharding_memory")
    return [f2(r["all"]["sharded_over_unsharded_trainable"]) + "x",
            f2(r["all"]["one_process"]["total"] / 1e9) + " GB", f2(r["all"]["sharded_2"][0]["total"] / 1e9) + " GB"]


# the README row (its first cell, up to the first comma or colon) -> (files it must link, what must appear in it,
# numbers in it that are settings rather than measurements)
ROWS: dict[str, tuple[list[str], Callable, list[str]]] = {
    "CartPole-v1": (["cartpole.json", "cartpole_zoo_rerun.json"], cartpole, ["5 seeds"]),
    "rollout tokens/s": (["rollout.json"], rollout, []),
    "one PPO iteration vs its compute floor": (["ppo_iteration.json"], ppo_iteration, ["4-16 tokens"]),
    "the batched env's cost next to a tiny GPT's decode step": (["env_overhead.json"], env_overhead, []),
    "IMDb reward model": (["reward_models.json"], reward_models, ["20-word"]),
    "RLHF, embedded corpus (RLOO)": (["rlhf_embedded.json", "rlhf_embedded_seed2.json"], rlhf_embedded,
                                     ["2 seeds"]),
    "RLHF, IMDb (the seed recipe's shapes, the earlier reward model from scratch)": (
        ["rlhf_imdb.json"], rlhf_imdb, ["seed: +1.53"]),
    "RLHF, SmolLM2-135M-Instruct": (["rlhf_smollm2_nrw4.json", "rlhf_smollm2_nrw4_seed2.json",
                                     "rlhf_smollm2_nrw4_seed3.json"], rlhf_smollm2,
                                    ["T = 0.7", "no repeated 3-gram", "no word of 4+ letters twice", "KL setpoint 5",
                                     "top 4 blocks", "3 seeds"]),
    "KL controller against its setpoint": (
        ["overoptimisation.json", "overoptimisation_smollm2.json", "rlhf_imdb.json", "rlhf_smollm2_log_pid.json",
         "rlhf_smollm2.json", "rlhf_smollm2_seed2.json", "rlhf_embedded.json", "rlhf_embedded_seed2.json"],
        kl_control, ["3 presets"]),
    "reward model vs held-out judge over KL": (["overoptimisation.json"], overoptimisation, ["40 iterations"]),
    "PPO on the calculator and guessing tasks": (["tools.json"], tools, ["5 seeds"]),
    "same seed, same run": (["determinism.json"], determinism, ["40 iterations"]),
    "data-parallel PPO": (["scaling.json"], scaling, ["2 processes", "1 single-threaded"]),
    "sharded PPO (`--shard`)": (["sharding_memory.json"], sharding_memory, ["2 ranks", "SmolLM2-135M"]),
}

# names with digits in them, not numbers: CartPole-v1, SmolLM2-135M-Instruct, distinct-2, 135M (but 2x is a number)
NAMES = re.compile(r"\b[A-Za-z][\w.-]*\d[\w.-]*|(?<![\d.])\b\d+[A-Za-wyz][\w-]*")


def spec_of(first_cell: str) -> tuple[list[str], Callable, list[str]]:
    matches = [key for key in ROWS if first_cell.startswith(key)]
    assert len(matches) == 1, f"no single entry of ROWS for the README row {first_cell!r}: add one"
    return ROWS[matches[0]]


def test_every_results_row_has_its_check():
    rows = results_rows()
    assert len(rows) >= 10
    for first in rows:
        spec_of(first)
    for key in ROWS:
        assert any(first.startswith(key) for first in rows), f"ROWS names {key!r}, which the README no longer has"


@pytest.mark.parametrize("first", list(results_rows()))
def test_results_row_matches_its_files(first):
    row = results_rows()[first]
    files, expected, settings = spec_of(first)
    linked = set(re.findall(r"\(benchmarks/results/([\w.]+\.json)\)", row))
    assert set(files) <= linked, f"the row links {sorted(linked)}, not {sorted(set(files) - linked)}"
    assert "](benchmarks/README.md#" in row, "the row links its section of benchmarks/README.md"
    rest = re.sub(r"\]\([^)]*\)", "]", row)  # link targets are names, not numbers
    rest = re.sub(r"\[`[^`]*`\]", "", rest)  # so are the linked files' names
    for text in expected():
        assert text in rest, f"{text!r} (from {files}) is not in the README row: {row}"
        rest = rest.replace(text, " ")
    for text in settings:
        assert text in rest, f"the setting {text!r} is not in the row any more: update ROWS"
        rest = rest.replace(text, " ")
    leftover = re.findall(r"\d[\d.,]*", NAMES.sub(" ", rest))
    assert not leftover, f"numbers in the README row that no JSON backs: {leftover} (row: {row})"


def test_readme_pairs_are_the_first_five_held_out_samples_of_the_file_they_cite():
    text = ROOT.joinpath("README.md").read_text()
    intro, table = text.split("What the `smollm2` preset does to SmolLM2-135M-Instruct", 1)[1].split("\n| prompt |", 1)
    cited = re.findall(r"\(benchmarks/results/([\w.]+)\.json\)", intro)
    assert len(cited) == 1, f"the pairs' paragraph cites one results file, not {cited}"
    lines = table.split("\n\n", 1)[0].splitlines()[2:]  # under the |---| line, to the table's end
    cells = [line.strip("| ").split(" | ") for line in lines]
    samples = load(cited[0])["samples"][:5]
    assert len(cells) == 5
    for (prompt, before, after), s in zip(cells, samples, strict=True):
        assert [prompt, before, after] == [" ".join(s[k].split()) for k in ("prompt", "before", "after")]


# --- every --flag the docs name ------------------------------------------------------------------------------------

class Parsed(Exception):
    """Raised in place of parsing: carries what the CLI would have parsed with."""


def walk(parser: argparse.ArgumentParser, seen: set[str]) -> set[str]:
    for action in parser._actions:
        seen.update(action.option_strings)
        if isinstance(getattr(action, "choices", None), dict):  # subcommands (the presets)
            for sub in action.choices.values():
                walk(sub, seen)
    return seen


def tyro_flags(call: Callable[[], object], monkeypatch) -> set[str]:
    """The flags of a tyro CLI: `call` runs the CLI's own parse function; its `tyro.cli(...)` call is caught and the
    same arguments build the parser instead."""
    import tyro

    def caught(*args, **kwargs):
        raise Parsed(args, kwargs)

    with monkeypatch.context() as m:
        m.setattr(tyro, "cli", caught)
        with pytest.raises(Parsed) as info:
            call()
    args, kwargs = info.value.args
    keep = {k: v for k, v in kwargs.items() if k in ("prog", "description", "default", "config")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # get_parser: still the public way to see the flags
        return walk(tyro.extras.get_parser(*args, **keep), set())


def argparse_flags(main: Callable[[], object], monkeypatch) -> set[str]:
    """The flags of an argparse CLI: `main` builds its parser; `parse_args` is caught before anything runs."""
    def caught(self, *args, **kwargs):
        raise Parsed(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", caught)
        with pytest.raises(Parsed) as info:
            main()
    return walk(info.value.args[0], set())


def benchmark(name: str):
    """benchmarks/<name>.py as a module (its `__main__` block does not run)."""
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"claims_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while they are made
    sys.path.insert(0, str(path.parent))  # the scripts import `_common` by its bare name
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


# flags of tools outside the project, by the word that starts their command
EXTERNAL = {"torchrun": {"--standalone", "--nproc-per-node", "--nnodes", "--node-rank", "--master-addr",
                         "--master-port", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id"},
            "tensorboard": {"--logdir"}, "pip": {"--no-deps"},
            "blind_reading.py": {"--n", "--seed"},
            "SBATCH": {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task"}}  # SLURM's sbatch


@pytest.fixture(scope="module")
def cli_flags() -> dict[str, set[str]]:
    """{command marker: its flags} for the project's three CLIs and every benchmark script."""
    from agents import ppo
    from agents.rlhf import job
    from textenv.build import pipeline

    with pytest.MonkeyPatch.context() as mp:
        flags = {"agents.rlhf": tyro_flags(lambda: job.parse_args([]), mp),
                 "agents.ppo": tyro_flags(lambda: ppo.parse_args([]), mp),
                 "textenv.build": tyro_flags(lambda: pipeline.parse_args([]), mp)}
        for path in sorted((ROOT / "benchmarks").glob("[a-z]*.py")):
            module = benchmark(path.stem)
            if hasattr(module, "Args"):
                flags[f"{path.stem}.py"] = tyro_flags(lambda module=module: __import__("tyro").cli(module.Args), mp)
            else:
                flags[f"{path.stem}.py"] = argparse_flags(module.main, mp)
    return flags | EXTERNAL


# a flag: kebab-case words joined by dots (`--ppo.kl-target`); `--ppo.*` names a family, not a flag
FLAG = r"(?<![\w-])(?P<flag>--[a-z](?:[a-z0-9-]|\.(?=[a-z]))*)(?P<family>\.\*)?"
COMMAND = r"-m (?P<module>agents\.rlhf|agents\.ppo|textenv\.build)\b|\b(?P<script>[a-z_]+\.py)\b|\b(?P<tool>torchrun|tensorboard|pip|SBATCH)\b"


def segments(text: str) -> list[str]:
    """Where one command line can live: each line of a fenced code block, each inline code span, each paragraph."""
    out, prose = [], []
    for i, block in enumerate(re.split(r"^```.*$", text, flags=re.M)):
        if i % 2:
            out += block.replace("\\\n", " ").splitlines()
        else:
            out += re.findall(r"`([^`]+)`", block)
            prose.append(re.sub(r"`[^`]+`", " ", block))
    return out + [p for block in prose for p in block.split("\n\n")]


def flags_in(text: str) -> list[tuple[str, str | None]]:
    """(flag, the command it follows in its segment, or None) for every `--flag` the text names."""
    out = []
    for seg in segments(text):
        marker = None
        for t in re.finditer(f"{COMMAND}|{FLAG}", seg):
            if not t["flag"]:
                marker = t["module"] or t["script"] or t["tool"]
            elif not t["family"]:
                out.append((t["flag"], marker))
    return out


def named_flags() -> list[tuple[str, str, str | None]]:
    """(doc, flag, command or None) for every `--flag` the docs name."""
    return [(doc.relative_to(ROOT).as_posix(), *found) for doc in DOCS for found in flags_in(doc.read_text())]


def test_flags_are_read_with_their_command():
    text = ("Run `torchrun --standalone -m agents.ppo zoo --num-envs 4`; `--ppo.*` flags (`--warm-start.*` too) and\n"
            "`--ppo.kl-target 4` go to\n\n```bash\npython benchmarks/overoptimisation.py --seeds 1 \\\n"
            "    --iterations 2   # --quick\n```\n")
    assert flags_in(text) == [("--standalone", "torchrun"), ("--num-envs", "agents.ppo"), ("--ppo.kl-target", None),
                              ("--seeds", "overoptimisation.py"), ("--iterations", "overoptimisation.py"),
                              ("--quick", "overoptimisation.py")]
    names = {flag for _, flag, _ in named_flags()}
    assert {"--ppo.kl-target", "--quick", "--eval-prompts"} <= names


def test_the_clis_flags_are_read(cli_flags):
    assert {"--ppo.kl-target", "--eval-prompts", "--max-new-tokens"} <= cli_flags["agents.rlhf"]
    assert {"--num-envs", "--dist-timeout"} <= cli_flags["agents.ppo"]
    assert "--warm-start.max-minutes" in cli_flags["textenv.build"]
    assert "--no-length-groups" in cli_flags["ppo_iteration.py"]
    assert "--no-group-prefill" not in cli_flags["ppo_iteration.py"]  # a flag the script no longer has
    assert "--no-cleanrl" in cli_flags["cartpole.py"]  # an argparse script


def test_every_flag_the_docs_name_exists(cli_flags):
    every = set().union(*cli_flags.values())
    wrong = []
    for doc, flag, marker in named_flags():
        known = cli_flags.get(marker, every) if marker else every
        if flag not in known:
            wrong.append(f"{doc}: {flag}" + (f" (not a flag of {marker})" if marker else " (no CLI has it)"))
    assert not wrong, "\n".join(wrong)


# --- the runs quoted as the current preset are of it ---------------------------------------------------------------

def differences(today: dict, ran: dict, prefix: str = "") -> list[str]:
    """Settings both configs have whose values differ (nested dicts compared key by key)."""
    out = []
    for key in today.keys() & ran.keys():
        a, b = today[key], ran[key]
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: today {a!r}, in the file {b!r}")
    return out


@pytest.mark.parametrize("name", ["rlhf_embedded", "rlhf_embedded_seed2"])
def test_the_embedded_runs_are_of_todays_preset(name):
    """The README quotes these runs as the main job: the config each file records agrees with today's `embedded`
    preset on every setting both have (seed, threads and run folder aside), and its command names that preset."""
    import dataclasses

    from agents.rlhf.config import PRESETS

    record = json.loads((RESULTS / f"{name}.json").read_text())
    assert record["command"].startswith("python benchmarks/rlhf_imdb.py --preset embedded ")
    assert not record["quick"]
    today = json.loads(json.dumps(dataclasses.asdict(PRESETS["embedded"]())))
    ran = record["results"]["config"]
    for key in ("seed", "torch_threads", "run_dir"):
        today["ppo"].pop(key), ran["ppo"].pop(key)
    assert len(today.keys() & ran.keys()) > 10 and len(today["ppo"].keys() & ran["ppo"].keys()) > 20
    assert not differences(today, ran), "\n".join(differences(today, ran))


def test_overoptimisation_eval_prompts_reach_the_prompts_it_cuts():
    """`--eval-prompts` sets the prompt count `prepare` cuts the held-out set with; its default is what the committed
    curves hold."""
    module = benchmark("overoptimisation")
    assert module.preset_config(module.Args(eval_prompts=32)).eval_prompts == 32
    assert module.Args().eval_prompts == load("overoptimisation")["before"]["n"] == 256


# --- the tests the docs name ---------------------------------------------------------------------------------------


def test_every_test_the_docs_name_exists_and_slow_ones_say_so():
    """`test_x.py::test_name` in a doc names a test function of that file; one the doc calls slow is marked slow."""
    named = 0
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            for file, name in re.findall(r"`(test_\w+\.py)::(test_\w+)`", line):
                source = (ROOT / "tests" / file).read_text()
                match = re.search(rf"((?:@pytest\.mark\.\w+.*\n)*)def {name}\(", source)
                assert match, f"{doc.name} names {file}::{name}, which does not exist"
                if f"{file}::{name}` (slow" in line:
                    assert "@pytest.mark.slow" in match.group(1), f"{doc.name} calls {file}::{name} slow; it is not"
                named += 1
    assert named >= 20  # docs/reliability.md alone names more
