"""Automation: `nox -s tests`, `nox -s lint`, `nox -s mps` (Apple hardware), `nox -s bench`."""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session):
    """The README's test command, in a fresh virtualenv."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(python=["3.12", "3.13"])
def tests_without_deepfilterlib(session):
    """Python >= 3.12, where DeepFilterLib has no wheel: df_mps.dsp stands in for libdf.

    Tests that compare against the real libdf skip (with a reason); the rest run, including
    DFN3 enhancement quality on the PyTorch DSP.
    """
    # deepfilternet pins deepfilterlib (no wheel past 3.11) and numpy<2 (none for 3.13), so it
    # goes in without its dependencies; pyproject brings its runtime needs on these Pythons.
    session.install("--no-deps", "deepfilternet==0.5.6")
    session.install("-e", ".[test]")
    session.run("python", "-c", "import df_mps, libdf; assert libdf.__df_mps_shim__")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session):
    session.install("ruff>=0.4")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session
def mps(session):
    """On an Apple-Silicon Mac: the whole suite, including tests marked `mps` (real hardware)."""
    if session.python_version is None and "darwin" not in __import__("sys").platform:
        session.skip("the mps session is meant for Apple hardware")
    session.install("-e", ".[test]")
    session.run("python", "-m", "df_mps", "doctor")
    session.run("python", "-m", "pytest", "-q", "-m", "mps or not mps", *session.posargs)


@nox.session
def bench(session):
    """Regenerate the benchmark tables (docs/performance.md) on this machine."""
    session.install("-e", ".[dev]")
    session.run("python", "benchmarks/run_all.py", *session.posargs)
