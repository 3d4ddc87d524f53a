import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# The test models are tiny: a second thread buys nothing and, on a busy 2-core machine, oversubscription
# slows small ops down by 10-100x. One thread keeps the suite's time predictable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pipeline_dirs(tmp_path_factory):
    """Trained tiny DDPM pipeline directories (epsilon and v-prediction), built once per test session."""
    pytest.importorskip("diffusers")
    from peers import make_pipeline_dir

    root = tmp_path_factory.mktemp("pipelines")
    torch.manual_seed(0)
    return {pred: make_pipeline_dir(root / pred, pred) for pred in ("epsilon", "v_prediction")}


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """The trained tiny Stable Diffusion directory (tests/tiny_sd.py, default arguments), built once per test
    session: five modules test on it, and each build trains it for about 10 s. Tests read it, never write it."""
    pytest.importorskip("transformers")
    from tiny_sd import make_tiny_sd_dir

    return make_tiny_sd_dir(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="session")
def digits():
    """The shipped digits model (reuse tests; a module may define its own ``digits``)."""
    from autotune.models.digits import load_digits

    return load_digits()


@pytest.fixture(scope="session")
def guided(digits):
    """unipc-bh2-o2 at NFE 6 with guidance 2 on digits: the guided run the reuse tests vary."""
    import dataclasses

    from autotune.sampling.named import build

    return dataclasses.replace(build("unipc-bh2-o2", digits.noise, 6), guidance=2.0)


@pytest.fixture(scope="session")
def gmm():
    """The analytic 2-D mixture in float64, shared by the search tests."""
    from autotune.models.registry import load_model

    return load_model("gmm2d", torch.float64)



def _start_postgres() -> tuple[str, list[str], str]:
    """(url, stop command, data folder) of a throwaway server started by .ci/postgres.sh (which installs
    PostgreSQL when run as root); RuntimeError saying why not."""
    script = Path(__file__).resolve().parent.parent / ".ci" / "postgres.sh"
    # sourced (so it exports the server's variables), then its stop-at-exit trap cleared: the server must
    # outlive this shell, and the session fixture stops it
    code = ('source "$1" >&2 || exit 1; trap - EXIT; '
            'printf "%s\\n" "$AUTOTUNE_TEST_POSTGRES_URL" "$AUTOTUNE_TEST_POSTGRES_STOP" "$AUTOTUNE_TEST_POSTGRES_DIR"')
    try:
        proc = subprocess.run(["bash", "-c", code, "conftest", str(script)], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{script.name} did not run ({e})") from None
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or len(lines) != 3 or not lines[0]:
        said = " ".join(proc.stderr.split())[-300:] or f"exit {proc.returncode}"
        raise RuntimeError(f"{script.name} could not start a server: {said}")
    return lines[0], shlex.split(lines[1]), lines[2]


NO_POSTGRES = "no PostgreSQL: "


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL database for the cache tests: $AUTOTUNE_TEST_POSTGRES_URL, or else a throwaway server
    for this session (the same .ci/postgres.sh that CI used to source), stopped when the session ends."""
    url = os.environ.get("AUTOTUNE_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    try:
        url, stop, datadir = _start_postgres()
    except RuntimeError as e:
        pytest.skip(f"{NO_POSTGRES}{e}")
    try:
        yield url
    finally:
        subprocess.run(stop, capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
        shutil.rmtree(datadir, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    """Why the PostgreSQL cache tests were skipped, if they were: said at the end of the run, not only with -rs.
    Read from the skip reports, which pytest-xdist's workers send to the process that prints this."""
    said = set()
    for report in terminalreporter.stats.get("skipped", []):
        message = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        why = message.split(NO_POSTGRES, 1)[1] if NO_POSTGRES in message else None
        if why is not None and why not in said:
            said.add(why)
            terminalreporter.write_line(f"PostgreSQL cache tests skipped: {why}", yellow=True)
