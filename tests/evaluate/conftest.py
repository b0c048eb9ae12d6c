"""Fixtures of the evaluation tests: the tiny synthetic suite and configs of tests/run_fixtures.py."""

from run_fixtures import _one_thread_for_run_tests, make_cfg, synth_root  # noqa: F401  (pytest fixtures)
