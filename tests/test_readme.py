"""The README's code runs as written: its Python blocks in order in one process (with 8 CPU
devices for the mesh example), and its `train.py` command lines parse into valid configs. The
client example that needs a running server runs in tests/serve/test_server.py. Blocks are read
and marked as for the documentation pages (tests/doc_blocks.py, tests/test_docs.py)."""

import os
import subprocess
import sys

import pytest
from doc_blocks import README, ROOT, blocks, config_arguments, page_script, train_commands

from jmoe.train.run_config import load_config


def test_readme_keeps_its_two_commands_and_an_example():
    code = [block.code for block in blocks(README)]
    assert any(c.strip().endswith("python3 train.py") for c in code)
    assert any("python3 serve.py --run runs/tiny" in c for c in code)
    assert any(b.runs_here for b in blocks(README))


def test_python_blocks_run_in_order(tmp_path):
    script = tmp_path / "readme.py"
    script.write_text(page_script(README))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("args", train_commands(README), ids=" ".join)
def test_train_command_lines_load_their_configs(args):
    load_config(*config_arguments(args))
