"""The test harness itself: each test's seed is stable across processes and shown on failure."""
import pathlib
import re

pytest_plugins = ["pytester"]

CONFTEST = (pathlib.Path(__file__).parent / "conftest.py").read_text()

FAILING_TEST = '''
import torch

def test_draws_and_fails():
    print("drew", torch.randint(0, 2**30, ()).item(), "seed", torch.initial_seed())
    assert False
'''


def _run(pytester, monkeypatch, hash_seed):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_case=FAILING_TEST)
    monkeypatch.setenv("PYTHONHASHSEED", hash_seed)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    drew = re.search(r"drew (\d+) seed (\d+)", out)
    shown = re.search(r"tfkernels seed.*\n.*torch\.manual_seed\((\d+)\)", out)
    assert drew, out
    assert shown, f"the seed is not in the failure report:\n{out}"
    return int(drew.group(1)), int(drew.group(2)), int(shown.group(1))


def test_seed_is_stable_across_processes_and_printed_on_failure(pytester, monkeypatch):
    draw_a, seed_a, shown_a = _run(pytester, monkeypatch, "1")
    draw_b, seed_b, shown_b = _run(pytester, monkeypatch, "2")  # a different str hash salt
    assert seed_a == seed_b == shown_a == shown_b
    assert draw_a == draw_b
