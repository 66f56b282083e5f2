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
    result = pytester.runpytest_subprocess()  # the plugin loads through its pytest11 entry point
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*memopt_limit exceeded: activations 4.00 MiB > limit 1.00 MiB*"])


TRAINING = """
import pytest, torch

def step(steps=2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512))
    optimizer = torch.optim.AdamW(model.parameters())
    for _ in range(steps):
        model(torch.randn(64, 512)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

# parameters 1,050,112 x 4 B = 4,200,448 B (4.01 MiB); gradients the same; AdamW: two moments, 8,400,896 B + steps
"""


def test_every_category_limit_fails_when_over_and_passes_when_under(pytester):
    """Parameters, gradients and optimizer state are known through the global hooks, so their limits can fail (they
    never could: the marker's tracker did not know what the parameters or the optimizer were)."""
    over = {"params": "4 MiB", "grads": "4 MiB", "optimizer": "8 MiB", "activations": "100 KiB",
            "temporaries": "100 KiB", "peak": "16 MiB"}
    # temporaries: AdamW's state counts as temporaries inside the step that creates it (it is found at its end)
    under = {"params": "4.1 MiB", "grads": "4.1 MiB", "optimizer": "8.1 MiB", "activations": "1 MiB",
             "temporaries": "16 MiB", "peak": "32 MiB"}
    tests = "".join(f"""
@pytest.mark.memopt_limit({key}="{over[key]}")
def test_over_{key}():
    step()

@pytest.mark.memopt_limit({key}="{under[key]}")
def test_under_{key}():
    step()
""" for key in over)
    pytester.makepyfile(TRAINING + tests)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=6, failed=6)
    result.stdout.fnmatch_lines(["*memopt_limit exceeded: params 4.01 MiB > limit 4.00 MiB*",
                                 "*memopt_limit exceeded: grads 4.01 MiB > limit 4.00 MiB*",
                                 "*memopt_limit exceeded: optimizer 8.01 MiB > limit 8.00 MiB*"])


def test_a_limit_that_cannot_be_measured_is_a_usage_error(pytester):
    pytester.makepyfile("""
        import pytest, torch

        @pytest.mark.memopt_limit(optimizer="1 MiB")
        def test_no_optimizer():
            torch.nn.Linear(8, 8)(torch.ones(2, 8)).sum().backward()
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*memopt_limit: cannot measure optimizer (no optimizer stepped)*usage error*"])


def test_the_markers_categories_agree_with_memopt_profile_on_the_same_step(pytester):
    """The tiny config's own session, stepped twice inside the test: the marker's own peaks of gradients, optimizer
    state and activations are memopt profile's to the byte; its parameters' are at least profile's."""
    import json
    import subprocess
    import sys

    from .helpers import CONFIGS, ROOT

    done = subprocess.run([sys.executable, "-m", "memopt", "profile", str(CONFIGS / "tiny.yaml"), "--steps", "1",
                           "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    profiled = json.loads(done.stdout)["runs"][0]["category_peak_bytes"]
    keys = ("params", "grads", "optimizer", "activations")
    under = ", ".join(f'{key}="{profiled[key] - 1} B"' for key in keys)
    # parameters: the marker's own peak also holds the 512 B of parameters the tiny model's build makes and lets go
    # (the test builds it inside the marker; profile measures after the build), so they are held only from below
    equal = ", ".join(f'{key}="{profiled[key]} B"' for key in keys[1:])
    pytester.makepyfile(f"""
        import pytest
        from memopt.engine.step import prepare, train_step
        from memopt.spec import load_spec

        def step():
            session = prepare(load_spec({str(CONFIGS / "tiny.yaml")!r}))
            train_step(session)
            train_step(session)

        @pytest.mark.memopt_limit({under})
        def test_one_byte_under():
            step()

        @pytest.mark.memopt_limit({equal})
        def test_equal():
            step()
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)  # not below profile's figures (one fails) nor above (one passes)
    failure = next(line for line in result.outlines if "memopt_limit exceeded" in line)
    for key in ("params", "grads", "optimizer", "activations"):  # each exactly 1 B over: the same figure
        assert f"{key} " in failure, failure
