"""TPU VM launch scripts (launch/*.sh), run against a fake ``gcloud``.

The fake ``gcloud`` (written into tmp_path, first on PATH) appends its arguments, one JSON array per call,
to a log file. The expected commands below are written by hand from the gcloud reference
(``gcloud compute tpus tpu-vm create|ssh|scp|delete``, ``gcloud compute tpus queued-resources
create|describe|delete``), not produced by the scripts.

With ``FAKE_WORKERS_ROOT`` set, the fake also plays the TPU workers: ``ssh --command=...`` runs the command
with bash in ``<root>/worker-<i>`` (its $HOME), and ``scp`` copies between those homes and local paths, so
the remote half of every script is executed too (fake ``curl``/``uv``/``pgrep``/``pkill`` stand in for
the metadata server, uv and procps).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "logs.sh", "kill.sh", "delete.sh"]
ALL_SHELL_FILES = SCRIPTS + ["lib.sh"]

PROJECT, ZONE, TPU, ACCEL, RUNTIME = "my-project", "us-east5-a", "my-tpu", "v5p-32", "v2-alpha-tpuv5"
LOC = [f"--zone={ZONE}", f"--project={PROJECT}"]
# A value that only survives if every quoting layer is exact: spaces, both quotes, $, backslash, newline.
TRICKY = "--xla_a=true --b='x y' \"q\" $HOME \\n back\\slash\nsecond line"

FAKE_GCLOUD = r'''#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
if "describe" in args:
    sys.stdout.write(os.environ.get("FAKE_DESCRIBE_OUTPUT", ""))
    sys.exit(int(os.environ.get("FAKE_DESCRIBE_RC", "0")))
root = os.environ.get("FAKE_WORKERS_ROOT")
if not root or args[:3] != ["compute", "tpus", "tpu-vm"]:
    sys.exit(0)
verb = args[3]
worker = next((a.split("=", 1)[1] for a in args if a.startswith("--worker=")), "0")
n = int(os.environ.get("FAKE_NUM_WORKERS", "1"))
workers = range(n) if worker == "all" else [int(worker)]
home = lambda w: os.path.join(root, "worker-%d" % w)
rc = 0
if verb == "ssh":
    command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    for w in workers:
        env = {{"HOME": home(w), "PATH": os.environ["FAKE_TOOLS"] + ":/usr/bin:/bin", "FAKE_WORKER_ID": str(w),
               "LANG": "C.UTF-8"}}
        rc |= subprocess.run(["bash", "-c", command], cwd=home(w), env=env).returncode
elif verb == "scp":
    pos = [a for a in args[4:] if not a.startswith("--")]
    *srcs, dst = pos
    for w in workers:
        for src in srcs:
            if ":" in dst:
                shutil.copy(src, os.path.join(home(w), dst.split(":", 1)[1]))
            else:
                path = os.path.join(home(w), src.split(":", 1)[1])
                if not os.path.exists(path):
                    print("scp: no such file: " + path, file=sys.stderr)
                    rc = 1
                    continue
                shutil.copy(path, dst)
sys.exit(rc)
'''

# Tools on the fake workers. Each records its argv (JSON) in $HOME/<tool>.calls.
FAKE_TOOLS = {
    # The TPU VM metadata server: agent-worker-number.
    "curl": 'print(os.environ["FAKE_WORKER_ID"])',
    # uv: `uv venv` makes a .venv whose python answers the import check.
    "uv": '''
if sys.argv[1:2] == ["venv"]:
    os.makedirs(".venv/bin", exist_ok=True)
    with open(".venv/bin/python", "w") as f:
        f.write("#!/bin/sh\\necho python 3.12.0 jax 0.0-fake\\n")
    os.chmod(".venv/bin/python", 0o755)
''',
    # procps: $HOME/procs holds the command lines of the running processes; pkill removes them unless
    # $HOME/ignore-term exists and the signal is TERM.
    "pgrep": '''
import re
procs = open(os.path.join(os.environ["HOME"], "procs")).read().splitlines() if os.path.exists(
    os.path.join(os.environ["HOME"], "procs")) else []
hits = [p for p in procs if re.search(sys.argv[-1], p)]
if "-af" in sys.argv:
    print("\\n".join(hits))
sys.exit(0 if hits else 1)
''',
    "pkill": '''
import re
path = os.path.join(os.environ["HOME"], "procs")
procs = open(path).read().splitlines() if os.path.exists(path) else []
hits = [p for p in procs if re.search(sys.argv[-1], p)]
if not (sys.argv[1] == "-TERM" and os.path.exists(os.path.join(os.environ["HOME"], "ignore-term"))):
    open(path, "w").write("".join(p + "\\n" for p in procs if p not in hits))
sys.exit(0 if hits else 1)
''',
}

# The job itself, placed as ~/gdsd-jax/.venv/bin/gdsd-jax on the fake workers: records argv, cwd, env.
FAKE_JOB = '''#!{python}
import json, os, sys
keep = ["CHECKPOINT_BUCKET", "RUN_NAME", "JAX_COMPILATION_CACHE_DIR", "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS",
        "TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "LIBTPU_INIT_ARGS", "PYTHONUNBUFFERED", "VIRTUAL_ENV"]
rec = {{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {{k: os.environ.get(k) for k in keep}}}}
with open(os.path.join(os.environ["HOME"], "job.calls"), "a") as f:
    f.write(json.dumps(rec) + "\\n")
print("step 1 reward 0.5")
'''


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


class Launch:
    """Runs the launch scripts with a fake gcloud and reads what it recorded."""

    def __init__(self, tmp: Path, launch_dir: Path = LAUNCH):
        self.tmp = tmp
        self.launch_dir = launch_dir
        self.bin = tmp / "bin"
        self.bin.mkdir()
        _write_exe(self.bin / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
        self.log = tmp / "gcloud.jsonl"
        self.work = tmp / "work"
        self.env_file = tmp / "env.sh"
        self.settings = {
            "PROJECT_ID": PROJECT, "ZONE": ZONE, "TPU_NAME": TPU, "ACCELERATOR_TYPE": ACCEL,
            "RUNTIME_VERSION": RUNTIME, "CHECKPOINT_BUCKET": "my-bucket", "RUN_NAME": "run-1",
            "LOCAL_WORK_DIR": str(self.work),
        }
        self.base_env = {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(tmp / "home"), "LANG": "C.UTF-8",
                         "FAKE_GCLOUD_LOG": str(self.log)}

    def write_env(self, **overrides: str | None) -> Path:
        settings = {**self.settings, **overrides}
        lines = [f"{k}={shlex.quote(v)}" for k, v in settings.items() if v is not None]
        self.env_file.write_text("# test settings\n" + "\n".join(lines) + "\n")
        return self.env_file

    def run(self, script: str, *args: str, env: dict | None = None, env_file: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        if env_file and not self.env_file.exists():
            self.write_env()
        args = list(args)
        if env_file:  # after the action (logs.sh tail) and before the command to run (run.sh -- ...)
            at = args.index("--") if "--" in args else len(args)
            args[at:at] = ["--env", str(self.env_file)]
        argv = ["bash", str(self.launch_dir / script), *args]
        return subprocess.run(argv, env={**self.base_env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        self.log.unlink()
        return calls


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"rc={res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res


def _command_of(call: list[str]) -> str:
    (cmd,) = [a.split("=", 1)[1] for a in call if a.startswith("--command=")]
    return cmd


def _without_command(call: list[str]) -> list[str]:
    return [a for a in call if not a.startswith("--command=")]


@pytest.fixture
def launch(tmp_path: Path) -> Launch:
    return Launch(tmp_path)


@pytest.fixture
def workers(tmp_path: Path, launch: Launch):
    """Two fake TPU workers (homes under tmp_path/workers) with the fake tools on their PATH."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name, body in FAKE_TOOLS.items():
        record = f"open(os.path.join(os.environ['HOME'], '{name}.calls'), 'a').write(json.dumps(sys.argv[1:]) + '\\n')"
        _write_exe(tools / name, f"#!{sys.executable}\nimport json, os, sys\n{record}\n{body}")
    root = tmp_path / "workers"
    homes = [root / f"worker-{w}" for w in range(2)]
    for h in homes:
        h.mkdir(parents=True)
    launch.base_env.update(FAKE_WORKERS_ROOT=str(root), FAKE_NUM_WORKERS="2", FAKE_TOOLS=str(tools))
    return homes


def _tool_calls(home: Path, tool: str) -> list[list[str]]:
    path = home / f"{tool}.calls"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _make_checkout(path: Path) -> Path:
    """A tiny stand-in for the checkout: what setup.sh must copy and what it must leave behind."""
    for rel, text in {
        "pyproject.toml": "[project]\nname = 'x'\n",
        "requirements/constraints-py312.txt": "jax==0.12.0.1\n",
        "gdsd_jax/__init__.py": "",
        "gdsd_jax/runs/keep.py": "# a package dir named like the top-level runs/ must be copied\n",
        "launch/env.example": "X=1\n",
        ".venv/bin/python": "big",
        ".venv312/lib/x": "big",
        ".git/HEAD": "ref",
        "runs/old/metrics.jsonl": "{}",
        "gdsd_jax/__pycache__/m.cpython-312.pyc": "",
        "launch/env.sh": "SECRET=1\n",
    }.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


# ----------------------------------------------------------------------------------------------------
# static checks


@pytest.mark.parametrize("name", ALL_SHELL_FILES + ["env.example"])
def test_bash_syntax(name: str) -> None:
    res = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    res = subprocess.run([shellcheck, "-x", *SCRIPTS, "lib.sh"], cwd=LAUNCH, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([shellcheck, "--shell=bash", "env.example"], cwd=LAUNCH, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_scripts_are_executable() -> None:
    for name in SCRIPTS:
        assert os.access(LAUNCH / name, os.X_OK), f"launch/{name} is not executable"


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_needs_no_settings_and_calls_nothing(launch: Launch, name: str) -> None:
    res = _ok(launch.run(name, "--help", env_file=False))
    assert name in res.stdout and "--dry-run" in res.stdout and "--env FILE" in res.stdout
    assert launch.calls() == []


def test_env_example_documents_every_setting_and_is_complete(launch: Launch) -> None:
    res = _ok(subprocess.run(["bash", "-c", f"source {shlex.quote(str(LAUNCH / 'lib.sh'))}; "
                              'printf "%s\\n" "${GDSD_SETTINGS[@]}"'], capture_output=True, text=True))
    settings = res.stdout.split()
    example = (LAUNCH / "env.example").read_text()
    undocumented = [s for s in settings if not re.search(rf"^#? ?{s}=", example, re.M)]
    assert not undocumented, f"settings missing from env.example: {undocumented}"
    # The example alone satisfies every script's required settings.
    for script, args in [("create.sh", []), ("setup.sh", []), ("run.sh", []), ("logs.sh", ["tail"]),
                         ("kill.sh", []), ("delete.sh", [])]:
        res = launch.run(script, *args, "--dry-run", "--env", str(LAUNCH / "env.example"), env_file=False,
                         env={"LOCAL_WORK_DIR": str(launch.work)})
        _ok(res)
    assert launch.calls() == []


# ----------------------------------------------------------------------------------------------------
# create / delete


@pytest.mark.parametrize("capacity,flags", [("on-demand", []), ("spot", ["--spot"]), ("reserved", ["--reserved"])])
def test_create_tpu_vm(launch: Launch, capacity: str, flags: list[str]) -> None:
    launch.write_env(CAPACITY=capacity)
    _ok(launch.run("create.sh"))
    assert launch.calls() == [["compute", "tpus", "tpu-vm", "create", TPU, *LOC, f"--accelerator-type={ACCEL}",
                               f"--version={RUNTIME}", *flags]]


def test_create_extra_flags(launch: Launch) -> None:
    launch.write_env(CREATE_EXTRA_ARGS="--network=my-net --subnetwork=my-sub")
    _ok(launch.run("create.sh"))
    (call,) = launch.calls()
    assert call[-2:] == ["--network=my-net", "--subnetwork=my-sub"]


def test_create_queued_resource_and_wait(launch: Launch) -> None:
    launch.write_env(USE_QUEUED_RESOURCE="1", CAPACITY="spot", QR_VALID_UNTIL_DURATION="6h")
    _ok(launch.run("create.sh", "--wait", env={"FAKE_DESCRIBE_OUTPUT": "ACTIVE\n"}))
    assert launch.calls() == [
        ["compute", "tpus", "queued-resources", "create", f"{TPU}-qr", f"--node-id={TPU}", *LOC,
         f"--accelerator-type={ACCEL}", f"--runtime-version={RUNTIME}", "--spot", "--valid-until-duration=6h"],
        ["compute", "tpus", "queued-resources", "describe", f"{TPU}-qr", *LOC, "--format=value(state.state)"],
    ]


def test_create_queued_resource_reports_failure(launch: Launch) -> None:
    launch.write_env(USE_QUEUED_RESOURCE="1", QUEUED_RESOURCE_ID="my-qr", CAPACITY="reserved")
    res = launch.run("create.sh", "--wait", env={"FAKE_DESCRIBE_OUTPUT": "FAILED\n"})
    assert res.returncode != 0 and "my-qr is FAILED" in res.stderr
    create, describe = launch.calls()
    assert create[:5] == ["compute", "tpus", "queued-resources", "create", "my-qr"] and "--reserved" in create
    assert describe[3:5] == ["describe", "my-qr"]


@pytest.mark.parametrize("qr", [False, True])
def test_delete(launch: Launch, qr: bool) -> None:
    launch.write_env(USE_QUEUED_RESOURCE="1" if qr else "0")
    _ok(launch.run("delete.sh", "--yes", "--async"))
    if qr:
        expected = ["compute", "tpus", "queued-resources", "delete", f"{TPU}-qr", *LOC, "--force", "--quiet", "--async"]
    else:
        expected = ["compute", "tpus", "tpu-vm", "delete", TPU, *LOC, "--quiet", "--async"]
    assert launch.calls() == [expected]
    # Without --yes, gcloud's own confirmation prompt stays on.
    _ok(launch.run("delete.sh"))
    assert "--quiet" not in launch.calls()[0]


# ----------------------------------------------------------------------------------------------------
# settings: required values, validation, precedence


@pytest.mark.parametrize("script,args,missing", [
    ("create.sh", [], "PROJECT_ID"), ("create.sh", [], "ZONE"), ("create.sh", [], "TPU_NAME"),
    ("create.sh", [], "ACCELERATOR_TYPE"), ("create.sh", [], "RUNTIME_VERSION"),
    ("setup.sh", [], "TPU_NAME"), ("run.sh", [], "CHECKPOINT_BUCKET"), ("run.sh", [], "RUN_NAME"),
    ("logs.sh", ["tail"], "RUN_NAME"), ("kill.sh", [], "ZONE"), ("delete.sh", [], "PROJECT_ID"),
])
def test_missing_setting_is_named(launch: Launch, script: str, args: list[str], missing: str) -> None:
    launch.write_env(**{missing: None})
    res = launch.run(script, *args)
    assert res.returncode == 2
    assert "missing required setting" in res.stderr and missing in res.stderr
    assert launch.calls() == []


def test_missing_settings_all_listed(launch: Launch) -> None:
    launch.write_env(ZONE=None, ACCELERATOR_TYPE=None)
    res = launch.run("create.sh")
    assert "ZONE, ACCELERATOR_TYPE" in res.stderr


@pytest.mark.parametrize("overrides,needle", [
    ({"CAPACITY": "cheap"}, "CAPACITY must be one of: on-demand spot reserved"),
    ({"USE_QUEUED_RESOURCE": "yes"}, "USE_QUEUED_RESOURCE must be one of: 0 1"),
    ({"CODE_MODE": "rsync"}, "CODE_MODE must be one of: copy clone"),
    ({"CODE_MODE": "clone"}, "REPO_URL"),
    ({"CHECKPOINT_BUCKET": "gs://my-bucket"}, "without gs://"),
    ({"RUN_NAME": "a b"}, "RUN_NAME must be"),
    ({"REMOTE_DIR": "../x"}, "REMOTE_DIR must be"),
    ({"REMOTE_DIR": "."}, "REMOTE_DIR must be"),
    ({"PASS_ENV": "OK BAD-NAME"}, "'BAD-NAME' is not a valid name"),
])
def test_bad_settings_are_named(launch: Launch, overrides: dict, needle: str) -> None:
    launch.write_env(**overrides)
    res = launch.run("run.sh")
    assert res.returncode == 2 and needle in res.stderr, res.stderr
    assert launch.calls() == []


@pytest.mark.parametrize("script,args,needle", [
    ("create.sh", ["--bogus"], "unknown argument '--bogus'"),
    ("run.sh", ["--worker", "two"], "--worker must be"),
    ("run.sh", ["--", "A=b", "cmd"], "write: -- env A=b"),
    ("logs.sh", ["follow"], "unknown action 'follow'"),
    ("kill.sh", ["--grace", "soon"], "--grace must be"),
    ("create.sh", ["--env", "/nonexistent/env.sh"], "env file not found: /nonexistent/env.sh"),
])
def test_bad_arguments(launch: Launch, script: str, args: list[str], needle: str) -> None:
    launch.write_env()
    res = launch.run(script, *args, env_file="--env" not in args)
    assert res.returncode == 2 and needle in res.stderr, res.stderr
    assert launch.calls() == []


def test_environment_overrides_env_file(launch: Launch) -> None:
    launch.write_env(ZONE="europe-west4-b")
    _ok(launch.run("create.sh", env={"ZONE": "us-central2-b", "CAPACITY": "spot"}))
    (call,) = launch.calls()
    assert "--zone=us-central2-b" in call and "--spot" in call


def test_settings_from_environment_only(launch: Launch) -> None:
    env = {k: v for k, v in launch.settings.items()}
    _ok(launch.run("delete.sh", env=env, env_file=False))
    assert launch.calls() == [["compute", "tpus", "tpu-vm", "delete", TPU, *LOC]]


def test_default_env_file_is_launch_env_sh(tmp_path: Path) -> None:
    copy = tmp_path / "checkout" / "launch"
    copy.mkdir(parents=True)
    for name in ALL_SHELL_FILES:
        shutil.copy2(LAUNCH / name, copy / name)
    launch = Launch(tmp_path, launch_dir=copy)
    (copy / "env.sh").write_text(f"PROJECT_ID=p-from-default\nZONE={ZONE}\nTPU_NAME={TPU}\n")
    _ok(launch.run("delete.sh", env_file=False))
    assert launch.calls() == [["compute", "tpus", "tpu-vm", "delete", TPU, f"--zone={ZONE}",
                               "--project=p-from-default"]]


# ----------------------------------------------------------------------------------------------------
# dry run: prints exactly what a real run executes, calls nothing


DRY_CASES = {
    "create-vm": ("create.sh", [], {"CAPACITY": "spot"}),
    "create-qr-wait": ("create.sh", ["--wait"], {"USE_QUEUED_RESOURCE": "1", "CAPACITY": "reserved"}),
    "setup-copy": ("setup.sh", [], {}),
    "setup-clone": ("setup.sh", [], {"CODE_MODE": "clone", "REPO_URL": "https://example.com/my-org/gdsd-jax.git",
                                     "REPO_REF": "v1.0"}),
    "run-detached": ("run.sh", [], {"PASS_ENV": "LIBTPU_INIT_ARGS", "LIBTPU_INIT_ARGS": TRICKY}),
    "run-foreground-cmd": ("run.sh", ["--foreground", "--worker", "0", "--", "python", "-c", "print('a b')"], {}),
    "logs-tail": ("logs.sh", ["tail", "--worker", "all", "--lines", "20"], {}),
    "logs-collect": ("logs.sh", ["collect"], {"NUM_WORKERS": "3"}),
    "kill": ("kill.sh", ["--grace", "10"], {}),
    "delete-qr": ("delete.sh", ["--yes"], {"USE_QUEUED_RESOURCE": "1"}),
}


@pytest.mark.parametrize("case", sorted(DRY_CASES))
def test_dry_run_prints_exactly_the_real_commands(launch: Launch, tmp_path: Path, case: str) -> None:
    script, args, overrides = DRY_CASES[case]
    launch.write_env(LOCAL_DIR=str(_make_checkout(tmp_path / "checkout")), **overrides)
    dry = _ok(launch.run(script, "--dry-run", *args))
    assert launch.calls() == [], "--dry-run must not call gcloud"
    assert not launch.work.exists(), "--dry-run must not run local commands either"
    assert dry.stdout.startswith(("gcloud ", "mkdir ", "#")), dry.stdout
    # The printed text is a shell script: run it as such (same fake gcloud) ...
    printed = tmp_path / "printed.sh"
    printed.write_text(dry.stdout)
    _ok(subprocess.run(["bash", "-eu", str(printed)], env={**launch.base_env, "FAKE_DESCRIBE_OUTPUT": "ACTIVE\n"},
                       capture_output=True, text=True, timeout=60))
    from_printed = launch.calls()
    assert from_printed
    # ... and it must issue exactly the calls that the real run issues.
    real = _ok(launch.run(script, *args, env={"FAKE_DESCRIBE_OUTPUT": "ACTIVE\n"}))
    assert launch.calls() == from_printed, real.stderr
    for call in from_printed:
        if any(a.startswith("--command=") for a in call):  # every remote script is valid shell
            check = subprocess.run(["bash", "-n", "-c", _command_of(call)], capture_output=True, text=True)
            assert check.returncode == 0, check.stderr


# ----------------------------------------------------------------------------------------------------
# setup: code and environment on every worker


def test_setup_copy_on_all_workers(launch: Launch, workers: list[Path], tmp_path: Path) -> None:
    checkout = _make_checkout(tmp_path / "checkout")
    launch.write_env(LOCAL_DIR=str(checkout))
    for home in workers:  # a stale file from an earlier copy, and an environment that must survive
        (home / "gdsd-jax" / ".venv").mkdir(parents=True)
        (home / "gdsd-jax" / "deleted_upstream.py").write_text("")
    _ok(launch.run("setup.sh"))
    scp, ssh = launch.calls()
    tarball = str(launch.work / "code.tar.gz")
    assert scp == ["compute", "tpus", "tpu-vm", "scp", tarball, f"{TPU}:gdsd-jax-code.tar.gz", *LOC, "--worker=all"]
    assert _without_command(ssh) == ["compute", "tpus", "tpu-vm", "ssh", TPU, *LOC, "--worker=all"]

    with tarfile.open(tarball) as tf:
        members = {m.name.removeprefix("./") for m in tf.getmembers() if m.isfile()}
    assert members == {"pyproject.toml", "requirements/constraints-py312.txt", "gdsd_jax/__init__.py",
                       "gdsd_jax/runs/keep.py", "launch/env.example"}
    for home in workers:
        tree = home / "gdsd-jax"
        assert (tree / "pyproject.toml").exists() and (tree / "gdsd_jax" / "runs" / "keep.py").exists()
        assert not (tree / "deleted_upstream.py").exists() and not (home / "gdsd-jax-code.tar.gz").exists()
        assert _tool_calls(home, "uv") == [
            ["venv", "--python", "3.12", ".venv"],
            ["pip", "install", "--python", ".venv/bin/python", "-c", "requirements/constraints-py312.txt",
             "jax[tpu]", "-e", ".[gcs]"],
        ]


def test_setup_without_constraints_file_warns(launch: Launch, workers: list[Path], tmp_path: Path) -> None:
    checkout = _make_checkout(tmp_path / "checkout")
    (checkout / "requirements" / "constraints-py312.txt").unlink()
    launch.write_env(LOCAL_DIR=str(checkout))
    res = _ok(launch.run("setup.sh"))
    assert "worker 0: warning: requirements/constraints-py312.txt not found" in res.stderr
    assert _tool_calls(workers[0], "uv")[-1] == ["pip", "install", "--python", ".venv/bin/python",
                                                 "jax[tpu]", "-e", ".[gcs]"]


def test_setup_clone_checks_out_the_ref(launch: Launch, workers: list[Path], tmp_path: Path) -> None:
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for step in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "one"]):
        _ok(subprocess.run(git + step, cwd=upstream, env=env, capture_output=True, text=True))
    (upstream / "pyproject.toml").write_text("[project]\n")
    _ok(subprocess.run(git + ["add", "."], cwd=upstream, env=env, capture_output=True, text=True))
    _ok(subprocess.run(git + ["commit", "-q", "-m", "two"], cwd=upstream, env=env, capture_output=True, text=True))
    _ok(subprocess.run(git + ["tag", "v2"], cwd=upstream, env=env, capture_output=True, text=True))
    _ok(subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "three"], cwd=upstream, env=env,
                       capture_output=True, text=True))
    v2 = subprocess.run(["git", "rev-parse", "v2"], cwd=upstream, capture_output=True, text=True).stdout.strip()

    launch.write_env(CODE_MODE="clone", REPO_URL=str(upstream), REPO_REF="v2")
    res = _ok(launch.run("setup.sh"))
    (ssh,) = launch.calls()  # no scp in clone mode
    assert ssh[3] == "ssh" and "--worker=all" in ssh
    for w, home in enumerate(workers):
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=home / "gdsd-jax", capture_output=True, text=True)
        assert head.stdout.strip() == v2
        assert f"worker {w}: ~/gdsd-jax at {v2}" in res.stdout
        assert _tool_calls(home, "uv")[0] == ["venv", "--python", "3.12", ".venv"]
    # A second setup reuses the clone and the venv: fetch + checkout, no new `uv venv`.
    launch.write_env(CODE_MODE="clone", REPO_URL=str(upstream), REPO_REF="main")
    _ok(launch.run("setup.sh"))
    assert [c[0] for c in _tool_calls(workers[0], "uv")] == ["venv", "pip", "pip"]


# ----------------------------------------------------------------------------------------------------
# run: the job and its environment on every worker


def _install_fake_job(home: Path) -> None:
    bin_dir = home / "gdsd-jax" / ".venv" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    _write_exe(bin_dir / "gdsd-jax", FAKE_JOB.format(python=sys.executable))


def _wait_for(path: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout} s")


def test_run_training_detached_on_all_workers(launch: Launch, workers: list[Path]) -> None:
    launch.write_env(TRAIN_EXTRA_ARGS="rl.num_steps=3 seed=7")
    for home in workers:
        _install_fake_job(home)
    res = _ok(launch.run("run.sh", env={"LIBTPU_INIT_ARGS": TRICKY}))
    (ssh,) = launch.calls()
    assert _without_command(ssh) == ["compute", "tpus", "tpu-vm", "ssh", TPU, *LOC, "--worker=all"]
    command = _command_of(ssh)
    assert "nohup gdsd-jax train" in command
    for w, home in enumerate(workers):
        assert f"worker {w}: started pid" in res.stdout
        (rec,) = [json.loads(x) for x in _wait_for(home / "job.calls").splitlines()]
        assert rec["argv"] == ["train", "--config", "configs/llada_8b_gsm8k.yaml", "--output-dir",
                               "gs://my-bucket/run-1", "--resume", "rl.num_steps=3", "seed=7"]
        assert Path(rec["cwd"]) == home / "gdsd-jax"
        assert rec["env"] == {
            "CHECKPOINT_BUCKET": "my-bucket", "RUN_NAME": "run-1",
            "JAX_COMPILATION_CACHE_DIR": "gs://my-bucket/jax-compilation-cache",
            "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "60", "TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES": "1024",
            "LIBTPU_INIT_ARGS": TRICKY, "PYTHONUNBUFFERED": "1", "VIRTUAL_ENV": str(home / "gdsd-jax" / ".venv"),
        }
        log = home / "gdsd-logs" / "run-1" / f"worker-{w}.log"
        text = _wait_for(log)
        deadline = time.monotonic() + 20
        while "step 1 reward 0.5" not in text and time.monotonic() < deadline:
            time.sleep(0.05)
            text = log.read_text()
        assert f"worker {w}: gdsd-jax train --config" in text and "step 1 reward 0.5" in text


def test_run_settings_switch_off_optional_env(launch: Launch) -> None:
    launch.write_env(COMPILATION_CACHE_DIR="", TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS="",
                     TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES="", PASS_ENV="")
    _ok(launch.run("run.sh", env={"LIBTPU_INIT_ARGS": "x"}))
    command = _command_of(launch.calls()[0])
    for name in ("JAX_COMPILATION_CACHE_DIR", "TENSORSTORE_", "LIBTPU_INIT_ARGS"):
        assert name not in command
    assert "GDSD_JAX_COMPILATION_CACHE=off" in command     # gdsd-jax's own default cache is off too
    assert "distributed.num_slices" not in command         # one slice: the recipe's mesh as it is


def test_run_passes_the_slice_count(launch: Launch) -> None:
    launch.write_env(NUM_SLICES="2")
    _ok(launch.run("run.sh"))
    assert "distributed.num_slices=2" in _command_of(launch.calls()[0])
    launch.write_env(NUM_SLICES="0")
    res = launch.run("run.sh")
    assert res.returncode != 0 and "NUM_SLICES" in res.stderr and "positive number of TPU slices" in res.stderr
    assert launch.calls() == []                                  # the bad value stopped before any call


def test_run_foreground_command_on_one_worker(launch: Launch, workers: list[Path]) -> None:
    launch.write_env()
    for home in workers:
        (home / "gdsd-jax").mkdir()
    res = _ok(launch.run("run.sh", "--foreground", "--worker", "1", "--",
                         "bash", "-c", "echo \"$RUN_NAME on $1\"; echo 'it''s done'", "_", "a b  c"))
    (ssh,) = launch.calls()
    assert "--worker=1" in ssh
    assert res.stdout.splitlines() == ["[worker 1] run-1 on a b  c", "[worker 1] its done"]
    local_copy = launch.work / "logs" / "run-1" / "foreground.log"
    assert local_copy.read_text() == res.stdout
    remote = (workers[1] / "gdsd-logs" / "run-1" / "worker-1.log").read_text()
    assert remote.endswith("run-1 on a b  c\nits done\n")
    assert not (workers[0] / "gdsd-logs").exists()


def test_run_foreground_failure_is_reported(launch: Launch, workers: list[Path]) -> None:
    launch.write_env()
    for home in workers:
        (home / "gdsd-jax").mkdir()
    res = launch.run("run.sh", "--foreground", "--", "bash", "-c", "echo boom; exit 3")
    assert res.returncode != 0 and "[worker 0] boom" in res.stdout


# ----------------------------------------------------------------------------------------------------
# logs


def test_logs_tail_and_collect(launch: Launch, workers: list[Path]) -> None:
    launch.write_env()
    for w, home in enumerate(workers):
        (home / "gdsd-logs" / "run-1").mkdir(parents=True)
        (home / "gdsd-logs" / "run-1" / f"worker-{w}.log").write_text("".join(f"w{w} line {i}\n" for i in range(5)))
    res = _ok(launch.run("logs.sh", "tail", "--no-follow", "--lines", "2", "--worker", "all"))
    assert res.stdout.splitlines() == ["[worker 0] w0 line 3", "[worker 0] w0 line 4",
                                       "[worker 1] w1 line 3", "[worker 1] w1 line 4"]
    (ssh,) = launch.calls()
    assert "--worker=all" in ssh
    # Default: worker 0, following (-F).
    _ok(launch.run("logs.sh", "tail", "--dry-run"))
    _ok(launch.run("logs.sh", "tail", "--no-follow"))
    (ssh,) = launch.calls()
    assert "--worker=0" in ssh and "tail -n 100 " in _command_of(ssh)

    dest = launch.tmp / "collected"
    res = _ok(launch.run("logs.sh", "collect", "--dest", str(dest),
                         env={"FAKE_DESCRIBE_OUTPUT": "10.0.0.1\n10.0.0.2\n"}))
    describe, *scps = launch.calls()
    assert describe == ["compute", "tpus", "tpu-vm", "describe", TPU, *LOC, "--flatten=networkEndpoints",
                        "--format=value(networkEndpoints.ipAddress)"]
    assert scps == [["compute", "tpus", "tpu-vm", "scp", f"{TPU}:gdsd-logs/run-1/worker-{w}.log",
                     str(dest / f"worker-{w}.log"), *LOC, f"--worker={w}"] for w in range(2)]
    for w in range(2):
        assert (dest / f"worker-{w}.log").read_text().startswith(f"w{w} line 0\n")


def test_logs_collect_keeps_going_when_a_worker_has_no_log(launch: Launch, workers: list[Path]) -> None:
    launch.write_env(NUM_WORKERS="2")
    (workers[1] / "gdsd-logs" / "run-1").mkdir(parents=True)
    (workers[1] / "gdsd-logs" / "run-1" / "worker-1.log").write_text("hello\n")
    res = launch.run("logs.sh", "collect")
    assert res.returncode != 0 and "worker 0: could not copy its log" in res.stderr
    assert (launch.work / "logs" / "run-1" / "worker-1.log").read_text() == "hello\n"
    assert len(launch.calls()) == 2  # NUM_WORKERS set: no describe


# ----------------------------------------------------------------------------------------------------
# kill


def test_kill_pattern_does_not_match_its_own_command(launch: Launch) -> None:
    launch.write_env()
    _ok(launch.run("kill.sh"))
    (ssh,) = launch.calls()
    assert _without_command(ssh) == ["compute", "tpus", "tpu-vm", "ssh", TPU, *LOC, "--worker=all"]
    command = _command_of(ssh)
    assert "pkill -TERM -f" in command and "P='[g]dsd-jax'" in command
    # The remote shell's own command line must not match (pkill would kill the shell running it), while
    # the trainer's does. pgrep/pkill use POSIX extended regexes; this one means the same in Python's re.
    assert "gdsd-jax" not in command
    assert re.search("[g]dsd-jax", "/home/u/gdsd-jax/.venv/bin/python .venv/bin/gdsd-jax train --resume")


@pytest.mark.parametrize("ignores_term", [False, True])
def test_kill_terminates_then_escalates(launch: Launch, workers: list[Path], ignores_term: bool) -> None:
    launch.write_env()
    job = "/usr/bin/python3 /home/u/gdsd-jax/.venv/bin/gdsd-jax train --resume"
    (workers[0] / "procs").write_text(job + "\nsshd: u@notty\n")
    (workers[1] / "procs").write_text("sshd: u@notty\n")
    if ignores_term:
        (workers[0] / "ignore-term").write_text("")
    res = _ok(launch.run("kill.sh", "--grace", "1"))
    assert (workers[0] / "procs").read_text() == "sshd: u@notty\n"
    signals = [c[0] for c in _tool_calls(workers[0], "pkill")]
    assert signals == (["-TERM", "-KILL"] if ignores_term else ["-TERM"])
    assert all(c[-1] == "[g]dsd-jax" for c in _tool_calls(workers[0], "pkill"))
    assert ("worker 0: still running after 1 s: SIGKILL" in res.stdout) == ignores_term
    assert "worker 1: no process matches" in res.stdout and _tool_calls(workers[1], "pkill") == []


def test_kill_now(launch: Launch, workers: list[Path]) -> None:
    launch.write_env()
    (workers[0] / "procs").write_text("python gdsd-jax train\n")
    _ok(launch.run("kill.sh", "--now", "--worker", "0"))
    assert [c[0] for c in _tool_calls(workers[0], "pkill")] == ["-KILL"]
    assert "--worker=0" in launch.calls()[0]
