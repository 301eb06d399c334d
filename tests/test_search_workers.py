"""Several worker processes share one search: a journal file on one machine, PostgreSQL across machines.

Each worker is a separate Python process running kdlib's own :func:`open_study` / :func:`run_study`
with a cheap objective, so the test checks the sharing, not the training (test_search covers that).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kdlib.search import open_study

WORKER = r"""
import json, os, socket, sys, time
from pathlib import Path
from kdlib.search import open_study, run_study

storage, folder, n_trials, name = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
study = open_study(storage, study_name="shared", seed=42)  # every worker gets the run's seed, as in 02
(folder / f"ready-{name}").touch()
deadline = time.monotonic() + 60
while len(list(folder.glob("ready-*"))) < 2 and time.monotonic() < deadline:  # start together
    time.sleep(0.05)
ran = []

def objective(trial):
    x = trial.suggest_float("x", -1.0, 1.0)
    time.sleep(0.25)
    ran.append(trial.number)
    return -x * x

run_study(study, objective, n_trials)
worker = f"{socket.gethostname()}:{os.getpid()}"
(folder / f"ran-{name}.json").write_text(json.dumps({"worker": worker, "ran": ran}))
"""

N_TRIALS = 12

STOPPED_WORKER = r"""
import sys, time
from pathlib import Path
from kdlib.search import open_study, run_study

storage, started = sys.argv[1], Path(sys.argv[2])

def objective(trial):
    trial.suggest_float("x", -1.0, 1.0)
    started.touch()
    time.sleep(120)  # a long training run, stopped from outside
    return 0.0

run_study(open_study(storage, study_name="stopped", seed=42), objective, 3)
"""


def test_a_worker_stopped_with_sigterm_marks_its_trial_failed(tmp_path):
    """kill (SIGTERM), not only Ctrl-C, must leave the journal without a trial RUNNING for good: a
    resumed search would list it as running forever (seen on CLINC150 before this was handled)."""
    import signal
    import time

    import optuna

    storage, started = str(tmp_path / "study.journal"), tmp_path / "started"
    worker = subprocess.Popen([sys.executable, "-c", STOPPED_WORKER, storage, str(started)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.05)
    assert started.exists(), worker.communicate()[1][-2000:]
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=60)
    assert worker.returncode != 0 and "stopped by signal" in err
    trials = open_study(storage, study_name="stopped").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL]


def _run_two_workers(storage: str, folder: Path) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, storage, str(folder), str(N_TRIALS), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
    return [json.loads((folder / f"ran-{name}.json").read_text()) for name in ("a", "b")]


def _check_shared(storage, logs: list[dict]) -> None:
    import optuna

    study = open_study(storage, study_name="shared")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    a, b = (set(log["ran"]) for log in logs)
    assert a and b, f"both workers ran trials (got {sorted(a)} and {sorted(b)})"
    assert not a & b, "no trial was run twice"
    assert a | b == {t.number for t in complete}, "every trial a worker ran is in the study, and nothing else"
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    # Workers given the same seed still draw different trials (a per-worker seeded sampler would not).
    assert len({t.params["x"] for t in complete}) == len(complete)
    # Workers stop at the shared count; each may finish the trial it had started.
    assert N_TRIALS <= len(complete) <= N_TRIALS + 1
    for log in logs:
        assert {t.number for t in complete if t.user_attrs["worker"] == log["worker"]} == set(log["ran"])


@pytest.mark.slow
def test_two_processes_share_one_journal_study(tmp_path):
    journal = tmp_path / "search.journal"
    logs = _run_two_workers(str(journal), tmp_path / "workers")
    _check_shared(str(journal), logs)
    print(f"journal: worker 1 ran {len(logs[0]['ran'])} trials, worker 2 {len(logs[1]['ran'])}")


# ---------------------------------------------------------------------------------------------
# PostgreSQL: a real server, started for the test (skipped, with the reason, where none is installed)
# ---------------------------------------------------------------------------------------------


def _postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return versions[-1].parent if versions else None


@pytest.fixture
def postgres_url():
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL server not installed (Debian: apt install postgresql); the journal test covers one machine"
        )
    pytest.importorskip("psycopg", reason="psycopg not installed: pip install -e '.[postgres]'")
    # The server refuses to run as root: then it runs as the `postgres` user, in a folder it can reach.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("tests run as root and there is no `postgres` user to run the server as")
        if shutil.which("runuser") is None:
            pytest.skip("tests run as root and `runuser` (util-linux) is missing to start the server as `postgres`")
    folder = Path(tempfile.mkdtemp(prefix="kdlib-pg-"))
    folder.chmod(0o755)
    data = folder / "data"
    if as_user:
        shutil.chown(folder, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]

    run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "kdlib", "--no-sync")
    options = f"-k {folder} -p {port} -c listen_addresses=''"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "server.log"), "-w", "start")
    try:
        run(str(bin_dir / "createdb"), "-h", str(folder), "-p", str(port), "-U", "kdlib", "optuna")
        yield f"postgresql+psycopg://kdlib@/optuna?host={folder}&port={port}"
    finally:
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_processes_share_one_postgresql_study(postgres_url, tmp_path):
    logs = _run_two_workers(postgres_url, tmp_path / "workers")
    _check_shared(postgres_url, logs)
    print(f"postgresql: worker 1 ran {len(logs[0]['ran'])} trials, worker 2 {len(logs[1]['ran'])}")
