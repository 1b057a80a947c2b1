"""The reference fixtures may be skipped only outside CI: in CI a missing folder fails."""

from __future__ import annotations

import _pytest.outcomes
import pytest

import conftest


@pytest.fixture
def no_fixtures(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "FIXTURES", tmp_path / "absent" / "fixtures")


@pytest.mark.parametrize("value", ["true", "1", "TRUE", "yes"])
def test_missing_fixtures_fail_in_ci(no_fixtures, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(_pytest.outcomes.Failed, match="CI must have them"):
        conftest.fixture_path("doconv", "any.pt")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_missing_fixtures_skip_outside_ci(no_fixtures, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(_pytest.outcomes.Skipped, match="reference fixtures not found"):
        conftest.fixture_path("doconv", "any.pt")


def test_present_fixture_missing_file_fails(monkeypatch, tmp_path):
    (tmp_path / "fixtures").mkdir()
    monkeypatch.setattr(conftest, "FIXTURES", tmp_path / "fixtures")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(_pytest.outcomes.Failed, match="reference fixture missing"):
        conftest.fixture_path("doconv", "any.pt")
