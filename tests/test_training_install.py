"""`pip install oxoptim` (torch and numpy only), then `oxoptim train`: a job runs, or stops at once
with the install command; an output that cannot be made is named once, on the terminal and in
summary.json. The optional packages (tqdm, matplotlib, snownlp) are made truly unimportable in
the child processes (see training_jobs.blocking_env); the console script is the installed one."""

import json
import os
import select
import subprocess
import sys
import time

import pytest

from training_jobs import blocking_env, oxoptim_command, reviews, run_cli, write_rows

OPTIONAL = ["tqdm", "matplotlib", "snownlp"]
INSTALL = 'pip install "oxoptim[train]"'

JOB = """
threads = 1
[data]
train = "reviews.jsonl"
max_len = 12
[model]
embed_dim = 8
hidden = 8
[[stages]]
name = "only"
epochs = 2
batch_size = 32
lr = 1e-2
"""


@pytest.fixture
def base_env(tmp_path):
    env = blocking_env(OPTIONAL, tmp_path)
    probe = "import importlib.util, sys\n" \
            "for m in sys.argv[1:]:\n" \
            "    assert importlib.util.find_spec(m) is None, m\n" \
            "    try:\n        __import__(m)\n    except ModuleNotFoundError:\n        continue\n" \
            "    sys.exit(m + ' imported')\n"
    r = subprocess.run([sys.executable, "-c", probe, *OPTIONAL], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr  # the environment really lacks them
    return env


def job(tmp_path):
    write_rows(tmp_path / "reviews.jsonl", reviews(120))
    (tmp_path / "job.toml").write_text(JOB)


def test_help_needs_no_optional_package(tmp_path, base_env):
    r = run_cli(["train", "--help"], cwd=tmp_path, env=base_env)
    assert r.returncode == 0 and "--resume" in r.stdout, r.stderr


def test_default_job_without_snownlp_stops_at_once_with_the_install_command(tmp_path, base_env):
    t0 = time.time()
    r = run_cli(["train", "--run-dir", "run"], cwd=tmp_path, env=base_env)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "'snownlp'" in r.stderr and INSTALL in r.stderr
    assert not (tmp_path / "run").exists() and time.time() - t0 < 60


def run_on_terminal(cmd, cwd, env, timeout=180):
    """Runs ``cmd`` with its stdout on a pseudo-terminal (so it shows progress as for a person at a
    terminal); returns (exit code, terminal text, stderr)."""
    import pty

    master, slave = pty.openpty()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    out, deadline = [], time.time() + timeout
    try:
        while time.time() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                out.append(data)
        else:
            p.kill()
            pytest.fail("the run did not finish in time")
        err = p.stderr.read().decode()
        return p.wait(), b"".join(out).decode(errors="replace"), err
    finally:
        os.close(master)
        p.stderr.close()


def test_user_job_runs_without_optional_packages_and_names_what_is_missing_once(tmp_path, base_env):
    job(tmp_path)
    rc, terminal, err = run_on_terminal(oxoptim_command() + ["train", "--config", "job.toml", "--run-dir", "run"],
                                        tmp_path, {**base_env, "OMP_NUM_THREADS": "1"})
    assert rc == 0, terminal + err
    assert "Traceback" not in terminal + err
    run = tmp_path / "run"
    assert (run / "final.pt").exists() and not (run / "curves.png").exists()
    assert "test accuracy" in terminal
    said = [l for l in (terminal + err).splitlines() if "is not installed" in l]
    assert len([l for l in said if "curves.png" in l]) == 1, said
    assert len([l for l in said if "progress bars" in l]) == 1, said
    assert all(INSTALL in l for l in said)
    missing = json.loads((run / "summary.json").read_text())["missing_outputs"]
    assert set(missing) == {"curves.png", "progress bars"}
    assert "matplotlib" in missing["curves.png"] and INSTALL in missing["curves.png"]
    assert "tqdm" in missing["progress bars"] and INSTALL in missing["progress bars"]


def test_quiet_run_still_names_the_missing_curves_once(tmp_path, base_env):
    job(tmp_path)
    r = run_cli(["train", "--config", "job.toml", "--run-dir", "run", "--quiet"], cwd=tmp_path, env=base_env)
    assert r.returncode == 0, r.stderr
    lines = [l for l in (r.stdout + r.stderr).splitlines() if "curves.png" in l]
    assert len(lines) == 1 and INSTALL in lines[0] and "matplotlib" in lines[0], r.stdout + r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["missing_outputs"]) == ["curves.png"]  # no terminal, so no progress bars missed


def test_reading_toml_without_tomllib_or_tomli_stops_with_the_install_command(tmp_path):
    job(tmp_path)
    r = run_cli(["train", "--config", "job.toml"], cwd=tmp_path, env=blocking_env(["tomllib", "tomli"], tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "'tomli'" in r.stderr and INSTALL in r.stderr


def test_train_extra_lists_what_the_messages_point_to():
    """The install command the messages give must bring every optional package."""
    import re
    from importlib import metadata

    requires = metadata.requires("oxoptim") or []
    train = {re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0] for r in requires
             if re.search(r"extra\s*==\s*[\"']train[\"']", r)}
    assert {"snownlp", "tqdm", "matplotlib", "tomli"} <= train, requires
