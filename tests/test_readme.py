"""The README's code runs as written: its Python blocks in order in one process (with 8 CPU
devices for the mesh example), and its `train.py` command lines parse into valid configs. The
client example that needs a running server runs in tests/serve/test_server.py."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from jmoe.train.run_config import load_config

ROOT = pathlib.Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


SERVER_CLIENT = "openai.OpenAI("  # a block that talks to a running `serve.py`


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)


def test_readme_has_python_and_bash_blocks():
    assert len(_blocks("python")) >= 4 and len(_blocks("bash")) >= 4


def test_python_blocks_run_in_order(tmp_path):
    script = tmp_path / "readme.py"
    blocks = [block for block in _blocks("python") if SERVER_CLIENT not in block]
    script.write_text("\n\n".join(blocks))
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


def _train_commands() -> list[list[str]]:
    commands = []
    for block in _blocks("bash"):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split("#", 1)[0]
            if "train.py" not in line:
                continue
            words = shlex.split(line.split("train.py", 1)[1].split("&")[0].split('"')[0])
            commands.append(words)
    return commands


# The tiny checkpoint the README's `model.init_from=...` lines stand for (its config.json is
# read), with the context of the checkpoints they name.
HF_CHECKPOINT = ROOT / "tests" / "fixtures" / "hf" / "mixtral"
HF_CONTEXT = "model.max_seq_len=32768"


@pytest.mark.parametrize("args", _train_commands(), ids=" ".join)
def test_train_command_lines_load_their_configs(args):
    config, overrides, words = None, [], iter(args)
    for word in words:
        if word == "--config":
            config = ROOT / next(words)
        elif word == "--workdir":
            next(words)
        elif word.startswith("model.init_from="):
            overrides += [f"model.init_from={HF_CHECKPOINT}", HF_CONTEXT]
        elif "=" in word and not word.startswith("-"):
            overrides.append(word)
    load_config(config, overrides)
