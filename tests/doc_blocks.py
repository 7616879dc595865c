"""The fenced code blocks of the README and the documentation pages, and how each is checked.

A block's mark is an HTML comment on the line just before its fence (invisible once rendered):
- `<!-- not run: why -->`: never executed (an accelerator, a cluster, a network install...);
- `<!-- run: server -->`: a client that talks to `serve.py`, run against a live test server
  (tests/serve/test_doc_clients.py).
Unmarked `python` blocks run in order, one namespace per page, in one process; unmarked `yaml`
blocks load as run configs. Every `bash` block must be marked `not run`; the `train.py` command
lines in bash blocks are still checked to load their configs. Other languages (`text`, `json`)
are shown output or data, not code.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shlex

ROOT = pathlib.Path(__file__).parents[1]
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("**/*.md"))
CODE_LANGUAGES = ("python", "bash", "yaml")
_FENCE = re.compile(
    r"^(?:<!-- (?P<mark>[^>]*?) -->\n)?```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```", re.M | re.S
)
_MARKS = re.compile(r"not run: .+|run: server")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced block: its page, the line of its first code line, language, code and mark."""

    page: pathlib.Path
    line: int
    language: str
    code: str
    mark: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runs_here(self) -> bool:
        """Whether the page's own process executes it (an unmarked Python block)."""
        return self.language == "python" and self.mark is None


def blocks(page: pathlib.Path) -> list[Block]:
    """The fenced blocks of `page`, in order. A mark that is neither form raises a ValueError."""
    text = page.read_text()
    found = []
    for match in _FENCE.finditer(text):
        mark = match["mark"]
        if mark is not None and not _MARKS.fullmatch(mark):
            mark_line = text.count("\n", 0, match.start()) + 1
            raise ValueError(
                f"{page.relative_to(ROOT)}:{mark_line}: unknown block mark <!-- {mark} -->; "
                "use <!-- not run: why --> or <!-- run: server -->"
            )
        line = text.count("\n", 0, match.start("code")) + 1
        found.append(Block(page, line, match["lang"], match["code"], mark))
    return found


def page_script(page: pathlib.Path) -> str:
    """The page's runnable Python blocks as one script whose line numbers are the page's own (so
    a traceback points at the Markdown line)."""
    script, at = [], 1
    for block in blocks(page):
        if block.runs_here:
            script.append("\n" * (block.line - at) + block.code)
            at = block.line + block.code.count("\n")
    return "".join(script)


def train_commands(page: pathlib.Path) -> list[list[str]]:
    """The arguments of every `train.py` command line in the page's bash blocks."""
    commands = []
    for block in blocks(page):
        if block.language != "bash":
            continue
        for line in block.code.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0]
            if "train.py" not in line:
                continue
            words = shlex.split(line.split("train.py", 1)[1].split("&")[0].split('"')[0])
            commands.append(words)
    return commands


# The tiny checkpoint that `model.init_from=...` lines stand for (its config.json is read), with
# the context of the checkpoints they name.
HF_CHECKPOINT = ROOT / "tests" / "fixtures" / "hf" / "mixtral"
HF_CONTEXT = "model.max_seq_len=32768"


def config_arguments(args: list[str]) -> tuple[pathlib.Path | None, list[str]]:
    """`(--config path, key.path=value overrides)` of one `train.py` argument list; a
    `model.init_from=` checkpoint is replaced by the committed tiny Mixtral fixture."""
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
    return config, overrides
