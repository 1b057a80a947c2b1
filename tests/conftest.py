"""Shared test set-up: the reference fixtures, float64 helpers, hypothesis profiles."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. This must be set
# before triton is first imported, hence here, before dynaconv is imported by any test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Tests check correctness, not speed: one configuration per kernel instead of autotuning
    # every new test shape over all of them (benchmarks autotune fully).
    os.environ.setdefault("DYNACONV_TRITON_AUTOTUNE", "0")

import pytest
from hypothesis import HealthCheck, settings

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"

settings.register_profile(
    "default", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def fixture_path(*parts: str) -> Path:
    """Path of a reference fixture.

    Skips the test with a clear reason when the ``shared/`` folder beside the checkout is absent,
    except in CI (``CI=true``), where the fixtures must be there: a missing folder fails.
    """
    path = FIXTURES.joinpath(*parts)
    if not FIXTURES.is_dir():
        reason = (
            f"reference fixtures not found at {FIXTURES} (the shared/ folder beside the checkout)"
        )
        if _in_ci():
            pytest.fail(f"{reason}; CI must have them")
        pytest.skip(reason)
    if not path.exists():
        pytest.fail(f"reference fixture missing: {path}")
    return path


def load_fixture(*parts: str) -> dict:
    return torch.load(fixture_path(*parts), map_location="cpu", weights_only=True)


def assert_close64(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-7, atol: float = 1e-9
) -> None:
    """The fixtures' float64 tolerance (README of the fixtures)."""
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), rtol=rtol, atol=atol
    )


@pytest.fixture(autouse=True)
def _fresh_measured_choices():
    """Measured ``impl="auto"`` choices are a per-process cache: none leaks between tests.

    Tests run ``auto`` by each family's rule (measuring off, the deterministic mode): which
    form a measurement picks depends on the machine's load, and two equal models compared
    bitwise must run the same form. The tests of measuring itself switch it on
    (``tests/test_dispatch.py``, and where a test says ``dispatch.measuring(True)``).
    """
    from dynaconv.dispatch import clear_measured_choices, measuring

    with measuring(False):
        yield
    clear_measured_choices()


#: ``--set`` overrides that make a recipe's training run tiny (seconds on a CPU).
TINY_RUN = (
    "--set",
    "model.kwargs.width=4",
    "--set",
    "data.train_subset=64",
    "--set",
    "data.val_subset=32",
    "--set",
    "train.plots=false",
    "--set",
    "train.tensorboard=false",
)


CHECKOUT = Path(__file__).resolve().parents[1]
#: Folders a test run may create or change in the checkout: caches of the tools themselves.
_CACHES = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache"}


def checkout_files(root: Path = CHECKOUT) -> set[str]:
    """Every file and folder under the checkout, caches excluded, relative to it."""
    found = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _CACHES and not d.endswith(".egg-info")]
        base = Path(folder).relative_to(root)
        found.update(str(base / name) for name in dirs + files)
    return found


@pytest.fixture(scope="session", autouse=True)
def _checkout_stays_clean():
    """No test writes into the checkout (run folders, exports...): all go to tmp_path."""
    before = checkout_files()
    yield
    added = sorted(checkout_files() - before)
    assert not added, f"tests wrote into the checkout: {', '.join(added[:20])}"


@pytest.fixture
def one_thread():
    """One torch thread for the test, the previous count restored after.

    For tests of many small ops (each an OpenMP region: on a busy machine two threads wait on
    each other, 10x slower measured) and for runs compared bitwise (the same thread count).
    A test file opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
