"""Mutation testing for purr: does the suite notice plausible one-line bugs? (Not run by CI.)

    python tools/mutate.py                 # every mutation, one at a time: KILLED or SURVIVED, then the score
    python tools/mutate.py --list          # the mutations and the tests each one runs
    python tools/mutate.py --only ema_decay_swapped --only zloss_not_squared

The mutations are in tools/mutations.toml, one [[mutation]] table each: name, file, where, old (text), new
(text), tests. `where` names a function, method (Class.method, or outer.inner for a nested function), class
or module-level assignment of the file, found with ast, and the old text must occur exactly once in that
definition's source, whitespace ignored (any run of spaces and line breaks matches any other, or none), so
reformatting the code, or changing it elsewhere, does not lose the target. For each, the repository's files
(`git ls-files` plus untracked files git does not ignore) are copied into a temporary folder, the old text is
replaced there, and the tests run there with a timeout; the working tree is never touched.
The same tests first run on an unmutated copy: a mutation is KILLED when a test that passes unmutated fails
(or errors, or the run times out) with it; tests that already fail unmutated cannot kill anything.
Tests are a pytest -k expression (a string, in which {NAME} stands for the expression NAME of the file's
[selections] table) or a list of node ids. Run with OMP_NUM_THREADS=1 on a busy machine.
"""
import argparse
import ast
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from collections import namedtuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Mutation = namedtuple("Mutation", "name file where old new tests")

MUTATIONS_FILE = os.path.join(ROOT, "tools", "mutations.toml")


def load_mutations(path=MUTATIONS_FILE):
    """The file's [[mutation]] tables as Mutations, {NAME} in a `tests` string replaced by [selections]'s
    NAME; a malformed file or entry exits with a one-line message."""
    shown = os.path.relpath(path, ROOT) if os.path.abspath(path).startswith(ROOT + os.sep) else path
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        sys.exit(f"{shown}: {e}")
    selections, mutations = data.get("selections", {}), []
    for i, entry in enumerate(data.get("mutation", []), 1):
        at = f"{shown}: mutation {i} ({entry.get('name', 'no name')})"
        problems = ([f"no {k}" for k in Mutation._fields if k not in entry]
                    + [f"unknown key {k}" for k in sorted(set(entry) - set(Mutation._fields))])
        if problems:
            sys.exit(f"{at}: " + "; ".join(problems))
        m = Mutation(**entry)
        if not all(isinstance(v, str) for v in m[:-1]):
            sys.exit(f"{at}: name, file, where, old and new must be strings")
        if isinstance(m.tests, str):
            try:
                m = m._replace(tests=m.tests.format(**selections))
            except KeyError as e:
                sys.exit(f"{at}: tests {m.tests!r} names no selection {e}")
            except (IndexError, ValueError, AttributeError) as e:
                sys.exit(f"{at}: tests {m.tests!r}: {e} (braces hold a selection's name)")
        elif not (isinstance(m.tests, list) and all(isinstance(t, str) for t in m.tests)):
            sys.exit(f"{at}: tests must be a string or a list of node ids")
        mutations.append(m)
    return mutations


MUTATIONS = load_mutations()


def repo_files():
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]


def copy_repo(dest, tests_file=None):
    for f in repo_files():
        os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
    if tests_file:  # another version of the suite (e.g. an older one, for a before/after score)
        shutil.copy2(tests_file, os.path.join(dest, "test_purr.py"))


def pytest_args(tests):
    return ["-k", tests] if isinstance(tests, str) else list(tests)


def run_tests(folder, tests, timeout, tag, deselect=()):
    """{test name: passed?} of the selected tests in folder, or None on timeout; the seconds taken; the
    output's tail. With `deselect` (tests failing unmutated, left out) it stops at the first failure."""
    xml = os.path.join(folder, f".mutate-{tag}.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
           "test_purr.py",
           *pytest_args(tests), *(["-x"] if tag != "base" else []),
           *(f"--deselect=test_purr.py::{t}" for t in deselect)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.time() - t0, "timeout"
    results = {}
    if os.path.isfile(xml):
        for case in ET.parse(xml).getroot().iter("testcase"):
            bad = any(child.tag in ("failure", "error") for child in case)
            skipped = any(child.tag == "skipped" for child in case)
            if not skipped:
                results[case.get("name")] = not bad
    return results, time.time() - t0, proc.stdout[-2000:] + proc.stderr[-2000:]


def definitions(tree):
    """{qualified name: (first line, last line)} of the functions, classes (with their decorators) and
    module-level assignments of a parsed file."""
    spans = {}

    def walk(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                spans[prefix + node.name] = (first, node.end_lineno)
                walk(node.body, prefix + node.name + ".")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and not prefix:
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        spans[target.id] = (node.lineno, node.end_lineno)
    walk(tree.body, "")
    return spans


def locate(text, m):
    """(start, end) offsets in text of m.old within the definition m.where, or ValueError why not."""
    spans = definitions(ast.parse(text))
    if m.where not in spans:
        raise ValueError(f"{m.name}: no definition {m.where} in {m.file}")
    lines = text.splitlines(keepends=True)
    first, last = spans[m.where]
    base = sum(map(len, lines[:first - 1]))
    source = "".join(lines[first - 1:last])
    found = list(re.finditer(r"\s*".join(map(re.escape, m.old.split())), source))
    if len(found) != 1:
        raise ValueError(f"{m.name}: the old text occurs {len(found)} times in {m.file}'s {m.where}, "
                         "not once")
    return base + found[0].start(), base + found[0].end()


def apply(folder, m):
    path = os.path.join(folder, m.file)
    text = open(path).read()
    start, end = locate(text, m)
    with open(path, "w") as f:
        f.write(text[:start] + m.new.strip() + text[end:])


def mutant(m, base, timeout, tests_file=None):
    """(status, detail, seconds) of one mutation, run in a fresh copy of the repository."""
    with tempfile.TemporaryDirectory(prefix=f"purr-mutant-{m.name}-") as folder:
        copy_repo(folder, tests_file)
        try:
            apply(folder, m)
        except ValueError as e:
            return "ERROR", str(e), 0.0
        failing = [t for t, ok in base.items() if not ok]
        results, secs, log = run_tests(folder, m.tests, timeout, m.name, failing)
    if results is None:
        return "KILLED", f"timeout after {timeout}s", secs
    killed = sorted(t for t, ok in results.items() if not ok and base.get(t, True))
    if killed:
        return "KILLED", "by " + ", ".join(killed), secs
    if not results:  # e.g. a suite without the tests meant for it
        return "SURVIVED", "no test selected: " + " ".join(log.split())[-120:], secs
    return "SURVIVED", f"{len(results)} tests passed", secs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
    p.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    p.add_argument("-j", type=int, default=1, metavar="N", help="mutations run at once (default 1)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutation's test run (default 900)")
    p.add_argument("--tests", metavar="FILE",
                   help="run this file as test_purr.py (default: the repository's)")
    a = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if not a.only or m.name in a.only]
    unknown = set(a.only or []) - {m.name for m in MUTATIONS}
    if unknown:
        p.error(f"unknown mutation(s): {', '.join(sorted(unknown))}; see --list")
    if a.list:
        for m in chosen:
            print(f"{m.name}: {m.file}, {m.where}: {m.old!r} -> {m.new!r}\n    tests: {m.tests}")
        return
    # The unmutated baseline of every test the chosen mutations run: a test failing there kills nothing.
    with tempfile.TemporaryDirectory(prefix="purr-mutant-baseline-") as folder:
        copy_repo(folder, a.tests)
        for m in chosen:
            try:
                locate(open(os.path.join(folder, m.file)).read(), m)
            except ValueError as e:
                print(f"warning: {e}", flush=True)
        exprs = sorted({m.tests for m in chosen if isinstance(m.tests, str)})
        ids = sorted({t for m in chosen if not isinstance(m.tests, str) for t in m.tests})
        base = {}
        for sel in ([" or ".join(f"({e})" for e in exprs)] if exprs else []) + ([ids] if ids else []):
            r, secs, log = run_tests(folder, sel, a.timeout * 4, "base")
            if r is None:
                sys.exit(f"the unmutated tests took more than {a.timeout * 4:.0f}s")
            base.update(r)
    failing = sorted(t for t, ok in base.items() if not ok)
    print(f"baseline: {len(base)} tests, {len(failing)} failing unmutated"
          + (f" ({', '.join(failing)})" if failing else ""), flush=True)
    killed = 0
    with concurrent.futures.ThreadPoolExecutor(max(1, a.j)) as pool:
        futures = [pool.submit(mutant, m, base, a.timeout, a.tests) for m in chosen]
        for m, fut in zip(chosen, futures):
            status, detail, secs = fut.result()
            killed += status == "KILLED"
            print(f"{status:8s} {m.name} ({m.file}, {secs:.0f}s): {detail}", flush=True)
    print(f"killed {killed} of {len(chosen)}")


if __name__ == "__main__":
    main()
