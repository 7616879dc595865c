"""serve.py as users run it: one completion with --prompt, start-up errors, and a server that
finishes its in-flight requests on SIGTERM and exits with 0."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _env():
    """The test process's persistent compilation cache, for the server process too."""
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(jax.config.jax_compilation_cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _serve(*args):
    return [sys.executable, str(ROOT / "serve.py"), *map(str, args)]


def test_prompt_prints_one_greedy_completion(run, engine):
    out = subprocess.run(
        _serve("--run", run[0], "--prompt", "def f(", "--max-tokens", 7),
        capture_output=True, text=True, timeout=600, env=_env(), check=True,
    )  # fmt: skip
    assert out.stdout == engine.generate("def f(", max_tokens=7)[0].text + "\n"


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda tmp: tmp / "nowhere", "the run directory"),
        (lambda tmp: tmp, "missing config.yaml"),
    ],
)
def test_an_incomplete_run_stops_at_start_up(tmp_path, make, expect):
    out = subprocess.run(
        _serve("--run", make(tmp_path)), capture_output=True, text=True, timeout=300, env=_env()
    )
    assert out.returncode != 0 and expect in out.stderr and "Traceback" not in out.stderr


def test_sigterm_finishes_the_stream_in_flight_and_exits_cleanly(run):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        _serve("--run", run[0], "--port", port, "--slots", 2),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        events, first = [], threading.Event()

        def read_stream():
            body = {"prompt": "d", "max_tokens": 60, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
                for line in resp.iter_lines():
                    events.append(line)
                    first.set()

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert first.wait(60)
        proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [e for e in events if e][-1] == "data: [DONE]"
    assert any('"finish_reason": "length"' in e for e in events)  # it ran to the end
