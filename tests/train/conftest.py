"""Fixtures of the whole-run tests: the corpus file and one uninterrupted reference run."""

import pytest
from run_cases import RESUMED, RUN, write_corpus

from jmoe.train.run import train_and_evaluate
from jmoe.train.run_config import load_config


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def reference_run(corpus, tmp_path_factory):
    """`(workdir, final metrics)` of the `RESUMED` run, uninterrupted."""
    workdir = tmp_path_factory.mktemp("reference")
    config = load_config(None, [*RUN, f"data.source={corpus}", *RESUMED])
    return workdir, train_and_evaluate(config, workdir)
