"""Every shipped suite validates, and plans jobs whose keys are unique (resume matches points by key)."""

import json

import pytest
from tokenfleet.config import known_names
from tokenfleet.measure.device import detect
from tokenfleet.measure.runner import RunContext, plan_all
from tokenfleet.measure.suite import load_suite


@pytest.mark.parametrize("name", known_names("suites"))
def test_suite_validates_and_plans_unique_jobs(name):
    suite = load_suite(name)
    assert suite.parts, name
    ctx = RunContext(device=detect("cpu"), suite=suite, datasheet=None)
    jobs = plan_all(suite, ctx)
    keys = [json.dumps(j.key, sort_keys=True) for j in jobs]
    assert len(keys) == len(set(keys)), "two jobs share a key: --resume could not tell them apart"
    assert list(suite.parts)[0] == "ceilings", "ceilings are measured first: every later point refers to them"


def test_default_suites_exist():
    names = known_names("suites")
    assert {"ci-cpu", "quick", "full"} <= set(names)
