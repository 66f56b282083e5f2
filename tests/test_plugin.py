"""The memopt_limit pytest marker (memopt/pytest_plugin.py): a test over its limit fails, naming the category."""

from __future__ import annotations

pytest_plugins = ["pytester"]


def test_pytest_marker_fails_over_and_passes_under(pytester):
    pytester.makepyfile("""
        import pytest, torch

        @pytest.mark.memopt_limit(peak="1 MiB")
        def test_under():
            x = torch.ones(1000, requires_grad=True)
            (x * 2).sum().backward()

        @pytest.mark.memopt_limit(peak="64 MiB", activations="1 MiB")
        def test_over():
            w = torch.ones(1024, 1024, requires_grad=True)
            x = torch.ones(512, 1024)
            (x @ w).relu().sum().backward()   # saved: x for the matmul (2 MiB), the relu output (2 MiB)
    """)
    result = pytester.runpytest()  # the plugin loads through its pytest11 entry point
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*memopt_limit exceeded: activations 4.00 MiB > limit 1.00 MiB*"])
