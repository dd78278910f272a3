"""Mutation testing of the modules users' results depend on (docs/TESTING.md, "Mutation testing").

    python tests/mutation.py sampler           # one module: mutmut over its file, its fast tests only
    python tests/mutation.py --score sampler   # a past run's score, its equivalent mutants taken out
    python tests/mutation.py --survivors sampler   # a past run's undetected mutants, each with its changed lines
    python tests/mutation.py --sample 200 model    # 200 of the module's mutants drawn at random (seed 0)
    python tests/mutation.py --sample 150 --seed 1 checks   # another, independent draw (its own scratch folder)
    python tests/mutation.py --recheck sampler     # a past run's undetected mutants against today's tests
    python tests/mutation.py --list            # the modules and the tests each one runs

Each module runs in its own scratch folder (outside the clone, $DLLAMA_MUTATION_DIR or the temp dir):
mutmut copies dllama/ and tests/ into <scratch>/mutants, rewrites the module's functions into
trampolines with one mutant each, and runs the tests that reach a mutated function, one forked
child per mutant with a CPU-time limit. The tests find ../shared from there through a link, as
they do from a clone. Not part of .ci/run: a module takes minutes to an hour on 2 cores.

The score is detected / (mutants - equivalent): a mutant is detected when a test failed on it, it ran
out of CPU time (an endless loop) or it crashed the test process; the equivalent ones (the same
behaviour for every input) are listed by hand in tests/mutation_equivalent.txt, each with its reason.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path(tempfile.gettempdir()) / "dllama-mutation"
EQUIVALENT = Path(__file__).resolve().parent / "mutation_equivalent.txt"
DETECTED = {"killed", "timeout", "segfault"}
UNDETECTED = {"survived", "no tests"}

# module -> (its files, the fast tests that exercise it: no cluster, serve or subprocess-heavy files)
MODULES: dict[str, tuple[list[str], list[str]]] = {
    "exchange": (["dllama/runtime/distributed/exchange.py"], [
        "tests/test_exchange.py",
        "tests/test_distributed_mesh.py::test_the_slices_exchange_gives_every_node_the_same_sum"]),
    "codecs": (["dllama/formats/codecs.py"], ["tests/test_formats.py"]),
    "sampler": (["dllama/runtime/sampler.py"], ["tests/test_sampler.py", "tests/test_sampler_statistics.py"]),
    "split": (["dllama/runtime/split.py"], ["tests/test_split.py"] + [f"tests/test_distributed.py::{t}" for t in (
        "test_split_constraints_name_the_node_counts_that_work",
        "test_every_byte_of_every_layer_tensor_is_on_some_node",
        "test_smollm2_shape_splits_unevenly_with_a_shared_kv_head",
        "test_memory_plan_halves_weights_and_cache",
        "test_weights_split_in_proportion_and_a_coordinator_root_holds_nothing",
        "test_weights_options_are_read_or_refused_with_the_fix",
        "test_plan_command_prints_every_node_and_whether_it_fits",
        "test_proportional_shares_hand_out_every_unit_and_follow_the_weights")]),
    "tokenizer": (["dllama/tokenizer/core.py", "dllama/tokenizer/faithful.py"],
                  ["tests/test_tokenizer.py", "tests/test_tokenizer_specials.py"]),
    "checks": (["dllama/validate/checks.py"], ["tests/test_validate.py"]),
    "model": (["dllama/runtime/model.py"], ["tests/test_runtime.py"]),
}

PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-m", "not slow"]
# mutmut's wall-clock limit per mutant is (its tests' time + 1 s) x this (15 by default). A mutant that deadlocks
# the exchange's threads waits on sockets, using no CPU: 5 ends each of the hundred such hangs in seconds, not 20.
# model's and checks' tests spend seconds in fixtures (converting models) that the test time leaves out: on a busy
# machine 15 marked unharmed mutants as timeouts (detected), so they get 50.
TIMEOUT_MULTIPLIER = {"exchange": 5.0, "model": 50.0, "checks": 50.0}


def mutmut_config(files: list[str], tests: list[str], timeout_multiplier: float = 15.0) -> str:
    def toml_list(items: list[str]) -> str:
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    return "\n".join([
        "[tool.mutmut]",
        'source_paths = ["dllama"]',
        f"only_mutate = {toml_list(files)}",
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}",
        f"pytest_add_cli_args = {toml_list(PYTEST_ARGS)}",
        "use_git_change_detection = false",
        f"timeout_multiplier = {timeout_multiplier}",
        "",
    ])


def prepare(name: str, scratch_root: Path) -> Path:
    files, tests = MODULES[name]
    scratch = scratch_root / name
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    (scratch / "dllama").symlink_to(ROOT / "dllama")
    (scratch / "tests").symlink_to(ROOT / "tests")
    (scratch / "shared").symlink_to((ROOT.parent / "shared").resolve())  # conftest's ../shared from mutants/
    (scratch / "pyproject.toml").write_text(mutmut_config(files, tests, TIMEOUT_MULTIPLIER.get(name, 15.0)))
    return scratch


def mutmut_env() -> dict[str, str]:
    # mutmut puts mutants/ first on sys.path itself; with it on PYTHONPATH too its stats run records nothing
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def statuses(scratch: Path, checked: bool = True) -> dict[str, str]:
    """Every mutant of a past run and mutmut's verdict on it (killed, survived, timeout, ...); those a
    sampled run left alone are left out unless `checked` is False."""
    results = subprocess.run(["mutmut", "results", "--all", "true"], cwd=scratch, env=mutmut_env(),
                             capture_output=True, text=True).stdout
    lines = (line.strip().partition(": ") for line in results.splitlines())
    return {name: status for name, _, status in lines if status and not (checked and status == "not checked")}


def verdicts(scratch: Path) -> dict[str, str]:
    """statuses(), with the verdicts of --recheck on the tests written since the run (or of --sample)."""
    found = statuses(scratch, checked=False)
    rechecked = scratch / "rechecked.json"
    if rechecked.exists():
        found |= {m: v for m, v in json.loads(rechecked.read_text()).items() if m in found}
    return {m: v for m, v in found.items() if v != "not checked"}


def undetected(scratch: Path) -> list[str]:
    """The mutants of a past run that no test detected (nor detects on a recheck)."""
    return [name for name, status in verdicts(scratch).items() if status in UNDETECTED]


def equivalent_mutants(path: Path = EQUIVALENT) -> dict[str, str]:
    """The hand-kept list: mutant name -> why it behaves as the original for every input."""
    listed = {}
    for line in path.read_text().splitlines():
        name, _, reason = line.partition(" ")
        if name and not name.startswith("#"):
            listed[name] = reason.strip()
    return listed


def score(name: str, scratch: Path) -> dict[str, object]:
    """The module's numbers: detected / (mutants - equivalent), and the listed equivalents a test kills
    (the list is stale there: a mutant's number moves when its function changes)."""
    found = verdicts(scratch)
    listed = {m for m in equivalent_mutants() if m in found}
    equivalent = {m for m in listed if found[m] in UNDETECTED}
    detected = sum(status in DETECTED for status in found.values())
    scored = len(found) - len(equivalent)
    numbers = {"module": name, "mutants": len(found), "detected": detected, "equivalent": len(equivalent),
               "undetected": scored - detected, "score": round(100 * detected / scored, 1) if scored else None,
               "listed but detected": sorted(listed - equivalent)}
    every = len(statuses(scratch, checked=False))
    if len(found) < every and scored:
        numbers["sampled from"] = every
        numbers["score 95% interval"] = [round(100 * b, 1) for b in wilson(detected, scored)]
    return numbers


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson interval of a proportion k / n: what a sample of the mutants says of them all."""
    centre, half = (k + z * z / 2) / (n + z * z), z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return max(0.0, centre - half), min(1.0, centre + half)


def sample_of(scratch: Path, n: int, seed: int = 0) -> list[str]:
    """n mutants of the module drawn at random: mutmut writes them all out first (a run filtered for a
    name that does not exist generates the mutants and stops)."""
    subprocess.run(["mutmut", "run", "--max-children", "1", "none.x_none__mutmut_0"], cwd=scratch,
                   env=mutmut_env(), capture_output=True)
    names = sorted(statuses(scratch, checked=False))
    return sorted(random.Random(seed).sample(names, min(n, len(names))))


def run(name: str, scratch_root: Path) -> int:
    """mutmut over the module from scratch (its record of which test reaches which function is made once per
    run: a run kept from before would not run the tests written since)."""
    scratch = prepare(name, scratch_root)
    code = subprocess.call(["mutmut", "run", "--max-children", "1"], cwd=scratch, env=mutmut_env())
    subprocess.call(["mutmut", "export-cicd-stats"], cwd=scratch, env=mutmut_env())
    subprocess.call(["mutmut", "results"], cwd=scratch, env=mutmut_env())
    stats = scratch / "mutants" / "mutmut-cicd-stats.json"
    if stats.exists():
        print(name, stats.read_text())
    print(json.dumps(score(name, scratch)))
    return code


def apply_mutant(diff: str, clone: Path) -> None:
    """Write `mutmut show`'s one-hunk diff into the clone's file. mutmut shows a method outside its class
    (indented as a function, but for its docstring's lines), so the hunk's lines are matched without their
    indentation, must match exactly once, and the added lines take the file's indentation."""
    lines = diff.splitlines()
    path = clone / next(line[4:] for line in lines if line.startswith("+++ "))
    hunk = lines[next(i for i, line in enumerate(lines) if line.startswith("@@")) + 1:]
    old = [line[1:] for line in hunk if line[:1] in (" ", "-")]
    source = path.read_text().split("\n")
    at = [i for i in range(len(source) - len(old) + 1)
          if all(source[i + k].strip() == line.strip() for k, line in enumerate(old))]
    if len(at) != 1:
        raise SystemExit(f"cannot place this mutant in {path}:\n{diff}")

    def indent(text: str) -> int:
        return len(text) - len(text.lstrip())

    out, k = [], at[0]
    for line in hunk:
        if line[:1] in (" ", "-"):
            shift = indent(source[k]) - indent(line[1:])
            if line[:1] == " ":
                out.append(source[k])
            k += 1
        elif line[:1] == "+":
            out.append(" " * shift + line[1:] if line[1:].strip() else "")
    path.write_text("\n".join(source[:at[0]] + out + source[k:]))


def run_sample(name: str, scratch_root: Path, n: int, seed: int = 0) -> None:
    """n of the module's mutants drawn at random, each run as --recheck runs one: in a copy of the clone, by a
    fresh pytest (model's tests hang in mutmut's forked children, which inherit the kernels' thread pool)."""
    scratch = prepare(name, scratch_root)
    recheck(name, scratch, sample_of(scratch, n, seed))


def recheck(name: str, scratch: Path, names: list[str] | None = None) -> None:
    """Each undetected mutant of a past run (but the listed equivalent ones), or each of `names`, applied to
    a copy of the clone and the module's tests run on it as they are now: what the tests written since the
    run kill, without a run of the whole module. The verdicts go to <scratch>/rechecked.json, which --score
    reads."""
    files, tests = MODULES[name]
    if names is None:
        names = [m for m in undetected(scratch) if m not in equivalent_mutants()]
    rechecked = scratch / "rechecked.json"
    found = json.loads(rechecked.read_text()) if rechecked.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        for folder in ("dllama", "tests", "docs"):   # docs: tests read what docs/VALIDATE.md names
            shutil.copytree(ROOT / folder, clone / folder, ignore=shutil.ignore_patterns("__pycache__"))
        (Path(tmp) / "shared").symlink_to((ROOT.parent / "shared").resolve())

        def tests_run() -> str:
            try:
                code = subprocess.run([sys.executable, "-m", "pytest", *PYTEST_ARGS, *tests], cwd=clone,
                                      env={**os.environ, "PYTHONPATH": str(clone)}, capture_output=True,
                                      timeout=180).returncode
            except subprocess.TimeoutExpired:
                return "timeout"
            if code < 0:
                return "segfault"   # killed by a signal: the mutant crashed the process (mutmut's word for it)
            return {0: "survived", 1: "killed"}.get(code, f"pytest exit code {code}")   # 1: a test failed

        if tests_run() != "survived":
            raise SystemExit(f"{name}'s tests do not pass on the unmutated copy: fix that first")
        for mutant in names:
            for f in files:
                shutil.copyfile(ROOT / f, clone / f)
            diff = subprocess.run(["mutmut", "show", mutant], cwd=scratch, env=mutmut_env(), capture_output=True,
                                  text=True).stdout
            apply_mutant(diff, clone)
            found[mutant] = tests_run()
            print(found[mutant], mutant, flush=True)
            rechecked.write_text(json.dumps(found, indent=1, ensure_ascii=False))   # kept if the run is stopped


def survivors(scratch: Path) -> None:
    """Each undetected mutant's name and its changed lines, but for the listed equivalent ones."""
    equivalent = equivalent_mutants()
    for name in undetected(scratch):
        if name in equivalent:
            continue
        shown = subprocess.run(["mutmut", "show", name], cwd=scratch, env=mutmut_env(), capture_output=True, text=True)
        diff = [d for d in shown.stdout.splitlines() if d[:1] in "-+" and d[:3] not in ("---", "+++")]
        print(f"== {name}", *diff, sep="\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=", ".join(MODULES))
    parser.add_argument("--list", action="store_true", help="the modules, their files and tests")
    parser.add_argument("--survivors", action="store_true", help="show each surviving mutant's diff of a past run")
    parser.add_argument("--score", action="store_true", help="a past run's score, equivalent mutants taken out")
    parser.add_argument("--recheck", action="store_true", help="a past run's undetected mutants against "
                        "today's tests")
    parser.add_argument("--sample", type=int, metavar="N", help="run N of the module's mutants, drawn at random")
    parser.add_argument("--seed", type=int, default=0, help="the --sample draw's seed: another seed, another "
                        "sample, kept in <dir>/seed<N> beside seed 0's")
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("DLLAMA_MUTATION_DIR", DEFAULT_DIR)))
    args = parser.parse_args(argv)
    if args.seed:   # --survivors, --recheck and --score with the same --seed read that sample's run
        args.dir = args.dir / f"seed{args.seed}"
    if args.list or not args.modules:
        for name, (files, tests) in MODULES.items():
            print(f"{name}: {' '.join(files)}  <-  {' '.join(tests)}")
        return 0
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module {unknown[0]!r}: one of {', '.join(MODULES)}")
    if args.survivors:
        for name in args.modules:
            survivors(args.dir / name)
        return 0
    if args.recheck:
        for name in args.modules:
            recheck(name, args.dir / name)
    if args.score or args.recheck:
        for name in args.modules:
            print(json.dumps(score(name, args.dir / name)))
        return 0
    if args.sample:
        for name in args.modules:
            run_sample(name, args.dir, args.sample, args.seed)
            print(json.dumps(score(name, args.dir / name)))
        return 0
    return max(run(name, args.dir) for name in args.modules)


if __name__ == "__main__":
    sys.exit(main())
