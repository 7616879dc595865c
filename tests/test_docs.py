"""The documentation site: it builds with warnings as errors, and its code runs as written.

Every page's unmarked Python blocks run in order (one namespace per page, all pages in one
process with 8 CPU devices for the mesh examples), its YAML blocks load as run configs and its
`train.py` command lines load their configs; every bash block is marked as not run. The marks and
the extraction are in tests/doc_blocks.py; the client blocks that talk to a server run in
tests/serve/test_doc_clients.py.
"""

import json
import os
import subprocess
import sys

import pytest
from doc_blocks import (
    CODE_LANGUAGES,
    DOC_PAGES,
    ROOT,
    blocks,
    config_arguments,
    page_script,
    train_commands,
)

from jmoe.train.run_config import load_config

IDS = [str(page.relative_to(ROOT)) for page in DOC_PAGES]

# Runs each page's script (given as path=script pairs on stdin) in a fresh namespace; a failure
# prints its traceback, whose lines are the Markdown page's own, and the process goes on.
_RUNNER = """
import json, sys, traceback
failed = []
for page, script in json.load(sys.stdin):
    try:
        exec(compile(script, page, "exec"), {"__name__": "__main__"})
    except BaseException:
        traceback.print_exc()
        failed.append(page)
print("FAILED:", failed)
sys.exit(1 if failed else 0)
"""


def test_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: broken links and anchors, missing nav pages and docstrings the
    API reference cannot parse all fail the build."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "api" / "jmoe" / "index.html").exists()


@pytest.mark.parametrize("page", DOC_PAGES, ids=IDS)
def test_code_blocks_are_run_or_marked(page):
    for block in blocks(page):
        if block.language == "bash":
            assert block.mark and block.mark.startswith("not run"), (
                f"{block.where}: a bash block is never run; mark it <!-- not run: why -->"
            )
        if block.mark == "run: server":
            assert block.language == "python", f"{block.where}: only Python clients run"
        if block.language not in CODE_LANGUAGES:
            assert block.mark is None, f"{block.where}: a {block.language!r} block is not code"


def test_python_blocks_run():
    scripts = [(str(page.relative_to(ROOT)), page_script(page)) for page in DOC_PAGES]
    scripts = [(page, script) for page, script in scripts if script]
    assert len(scripts) >= 8
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["MPLBACKEND"] = "Agg"
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps(scripts),
        env=env,
        cwd=ROOT,  # pages name presets as configs/...
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-6000:] + result.stdout[-1000:]


@pytest.mark.parametrize("page", DOC_PAGES, ids=IDS)
def test_yaml_blocks_load_as_configs(page, tmp_path):
    for i, block in enumerate(b for b in blocks(page) if b.language == "yaml" and not b.mark):
        path = tmp_path / f"block{i}.yaml"
        path.write_text(block.code)
        try:
            load_config(path)
        except ValueError as e:
            raise AssertionError(f"{block.where}: {e}") from None


_COMMANDS = [(page, args) for page in DOC_PAGES for args in train_commands(page)]


@pytest.mark.parametrize(
    "page, args", _COMMANDS, ids=[f"{p.name}: {' '.join(a)}" for p, a in _COMMANDS]
)
def test_train_command_lines_load_their_configs(page, args):
    load_config(*config_arguments(args))
