"""The documentation's client examples (blocks marked `<!-- run: server -->`, see
tests/doc_blocks.py) run as written against a live server of the tiny test model, with the
address and model id replaced by the test server's."""

import pytest
from conftest import LiveServer
from doc_blocks import DOC_PAGES, README, blocks

from jmoe.serve.app import create_app

CLIENT_BLOCKS = [
    b for page in [README, *DOC_PAGES] for b in blocks(page) if b.mark == "run: server"
]


@pytest.fixture(scope="module")
def open_server(engine):
    """The engine behind a live HTTP server without an API key, as `serve.py` starts by default."""
    live = LiveServer(create_app(engine))
    yield live
    live.stop()


def test_the_docs_have_client_examples():
    assert len(CLIENT_BLOCKS) >= 4


@pytest.mark.parametrize("block", CLIENT_BLOCKS, ids=[b.where for b in CLIENT_BLOCKS])
def test_client_block_runs_against_a_server(block, open_server, engine):
    code = block.code.replace("http://127.0.0.1:8000", open_server.url)
    code = code.replace('"tiny"', repr(engine.name))
    code = "\n" * (block.line - 1) + code  # tracebacks point at the page's own lines
    exec(compile(code, str(block.page), "exec"), {"__name__": "__main__"})
