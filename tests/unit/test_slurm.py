"""The SLURM scripts and the container files, run against stand-in srun, apptainer, scontrol and ttc."""

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.helpers import REPO

FIT = REPO / "slurm" / "fit.sbatch"
VALIDATE = REPO / "slurm" / "validate.sbatch"
BUILD = REPO / "containers" / "build.sh"
JOB_ID = "4242"

# Each stand-in appends its arguments, shell-quoted, as one line of $STANDIN_LOG/<name>.log.
RECORD = 'printf "%q " "$@" >>"$STANDIN_LOG/${0##*/}.log"; echo >>"$STANDIN_LOG/${0##*/}.log"\n'
STANDINS = {
    "srun": RECORD
    + 'echo "${SRUN_CPUS_PER_TASK:-unset}" >"$STANDIN_LOG/srun.cpus"\n'
    + 'while [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
    # `apptainer exec [--opts] IMAGE CMD...` runs CMD with the APPTAINERENV_ variables applied, as apptainer does.
    "apptainer": RECORD
    + 'pwd >"$STANDIN_LOG/apptainer.cwd"\n[[ $1 == exec ]] || exit 0\nshift\n'
    + "while [[ $1 == --* ]]; do shift; done\nshift\n"
    + "for var in $(compgen -e APPTAINERENV_); do name=${var#APPTAINERENV_}\n"
    + '  if [[ $name == PREPEND_PATH ]]; then PATH=${!var}:$PATH; else export "$name=${!var}"; fi\ndone\n'
    + 'exec "$@"\n',
    "scontrol": RECORD,
    # Lightning calls `scontrol requeue JOB` after saving its checkpoint on SIGUSR1; FAKE_SIGUSR1 plays that part.
    "ttc": RECORD + '[[ -z ${FAKE_SIGUSR1:-} ]] || scontrol requeue "$SLURM_JOB_ID"\n',
}


@dataclass
class Cluster:
    """A submit directory (`work`) with the stand-ins on PATH."""

    root: Path

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def log(self) -> Path:
        return self.root / "standin"

    def run(self, script: Path, *args: str, **env: str | None) -> subprocess.CompletedProcess:
        path = {"PATH": f"{self.root / 'bin'}:/usr/bin:/bin", "HOME": str(self.root), "STANDIN_LOG": str(self.log)}
        env = {**path, **{k: v for k, v in env.items() if v is not None}}
        return subprocess.run(["bash", str(script), *args], cwd=self.work, env=env, capture_output=True, text=True)

    def calls(self, name: str) -> list[list[str]]:
        log = self.log / f"{name}.log"
        return [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []

    def read(self, name: str) -> str:
        return (self.log / name).read_text().strip()


@pytest.fixture
def cluster(tmp_path) -> Cluster:
    for d in ("bin", "standin", "work/configs"):
        (tmp_path / d).mkdir(parents=True)
    for name, body in STANDINS.items():
        (tmp_path / "bin" / name).write_text("#!/bin/bash\n" + body)
        (tmp_path / "bin" / name).chmod(0o755)
    (tmp_path / "work" / "configs" / "patch.yaml").write_text("trainer: {}\n")
    return Cluster(tmp_path)


def job(name: str = "ttc-fit", gpus: str = "1", tasks: str = "1", nodes: str = "1") -> dict[str, str]:
    return {
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NAME": name,
        "SLURM_NNODES": nodes,
        "SLURM_NTASKS_PER_NODE": tasks,
        "SLURM_NTASKS": str(int(tasks) * int(nodes)),
        "SLURM_GPUS_ON_NODE": gpus,
        "SLURM_CPUS_PER_TASK": "8",
    }


def fit_args(devices: str, nodes: str, ckpt: str = "last", run_dir: str = "runs/ttc-fit") -> list[str]:
    return [
        "fit", "--config", "configs/patch.yaml", "--trainer.default_root_dir", run_dir,
        "--trainer.num_nodes", nodes, "--trainer.devices", devices, "--ckpt_path", ckpt,
    ]  # fmt: skip


def sbatch_lines(script: Path) -> list[str]:
    return [
        line.removeprefix("#SBATCH").strip() for line in script.read_text().splitlines() if line.startswith("#SBATCH")
    ]


@pytest.mark.parametrize("script", [FIT, VALIDATE, BUILD], ids=lambda p: p.name)
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize("script", [FIT, VALIDATE, BUILD], ids=lambda p: p.name)
def test_scripts_pass_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", [FIT, VALIDATE], ids=lambda p: p.name)
def test_sbatch_header(script):
    text = script.read_text()
    markers = [text.index(m) for m in ("# --- SBATCH ---", "# --- env ---", "# --- launch ---")]
    assert markers == sorted(markers)
    # sbatch stops reading #SBATCH lines at the first command, so all of them must come before it.
    lines = text.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    options = dict(line.partition("=")[::2] for line in sbatch_lines(script))
    assert options["--ntasks-per-node"] == options["--gpus-per-node"]
    # SLURM opens the log before the script runs and creates no folder: the folder must not depend on the job.
    assert "%" not in str(Path(options["--output"]).parent)


def test_fit_header_requeues_before_the_time_limit():
    options = sbatch_lines(FIT)
    assert {"--signal=SIGUSR1@90", "--requeue", "--open-mode=append"} <= set(options)


@pytest.mark.parametrize(
    ("allocation", "devices", "nodes"),
    [
        ({}, "1", "1"),
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "4"}, "4", "1"),
        # a typed request, seen only as SLURM_GPUS_PER_NODE
        (
            {
                "SLURM_GPUS_ON_NODE": None,
                "SLURM_GPUS_PER_NODE": "h100:4",
                "SLURM_NTASKS_PER_NODE": "4",
                "SLURM_NNODES": "2",
                "SLURM_NTASKS": "8",
            },
            "4",
            "2",
        ),
    ],
    ids=["1-gpu", "4-gpus", "2-nodes-x-4-gpus"],
)
def test_fit_command_line(cluster, allocation, devices, nodes):
    result = cluster.run(FIT, **{**job(), **allocation})
    assert result.returncode == 0, result.stderr
    assert cluster.calls("srun") == [["--kill-on-bad-exit=1", "ttc", *fit_args(devices, nodes)]]
    assert cluster.calls("ttc") == [fit_args(devices, nodes)]
    assert cluster.read("srun.cpus") == "8"  # srun gets the allocation's cores per task
    assert (cluster.work / "runs" / "ttc-fit").is_dir()


@pytest.mark.parametrize(
    "gpus",
    [
        {"SLURM_GPUS_ON_NODE": "4"},
        {"SLURM_GPUS_PER_NODE": "4"},
        {"SLURM_GPUS_PER_NODE": "a100:2,h100:2"},  # 2 + 2
        {"SLURM_JOB_GPUS": "0,1,2,3"},
    ],
)
def test_gpus_per_node_sources(cluster, gpus):
    result = cluster.run(FIT, **{**job(tasks="4"), "SLURM_GPUS_ON_NODE": None, **gpus})
    assert result.returncode == 0, result.stderr
    assert cluster.calls("ttc") == [fit_args("4", "1")]


def test_extra_arguments_and_settings_pass_through(cluster, tmp_path):
    (cluster.work / "configs" / "other.yaml").write_text("trainer: {}\n")
    run_dir = str(tmp_path / "elsewhere")
    env = {**job(), "CONFIG": "configs/other.yaml", "RUN_DIR": run_dir}
    result = cluster.run(FIT, "--trainer.max_steps", "7", "--ckpt_path", "mine.ckpt", **env)
    assert result.returncode == 0, result.stderr
    expected = fit_args("1", "1", run_dir=run_dir)
    expected[2] = "configs/other.yaml"
    # Later arguments win in the CLI, so the user's --ckpt_path overrides the script's.
    assert cluster.calls("ttc") == [[*expected, "--trainer.max_steps", "7", "--ckpt_path", "mine.ckpt"]]


@pytest.mark.parametrize("newest", ["hpc_ckpt_2.ckpt", "lightning_logs/version_0/checkpoints/last.ckpt"])
def test_fit_resumes_from_the_newest_checkpoint(cluster, newest):
    run_dir = cluster.work / "runs" / "ttc-fit"
    hpc, last = run_dir / "hpc_ckpt_2.ckpt", run_dir / "lightning_logs/version_0/checkpoints/last.ckpt"
    # Neither a last nor a SIGUSR1 checkpoint, so its being the newest file must not count.
    other = run_dir / "lightning_logs/version_1/checkpoints/epoch=3-step=900.ckpt"
    for path in (hpc, last, other):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    older = last if newest == "hpc_ckpt_2.ckpt" else hpc
    os.utime(older, (1_000, 1_000))
    os.utime(run_dir / newest, (2_000, 2_000))
    os.utime(other, (3_000, 3_000))
    result = cluster.run(FIT, **job())
    assert result.returncode == 0, result.stderr
    assert cluster.calls("ttc") == [fit_args("1", "1", ckpt=f"runs/ttc-fit/{newest}")]


@pytest.mark.parametrize(
    ("allocation", "message"),
    [
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "1"}, "--ntasks-per-node=1 but 4 GPUs per node"),
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": None}, "--ntasks-per-node=unset but 4 GPUs"),
        ({"SLURM_GPUS_ON_NODE": None}, "no GPUs in this allocation"),
        ({"SLURM_GPUS_ON_NODE": "gpu:x"}, "cannot read a GPU count from 'gpu:x'"),
        ({"SLURM_JOB_ID": None}, "submit this script with sbatch"),
        ({"CONFIG": "configs/missing.yaml"}, "no config at configs/missing.yaml"),
        ({"TTC_CONTAINER": "missing.sif"}, "TTC_CONTAINER=missing.sif: no such image"),
    ],
)
@pytest.mark.parametrize("script", [FIT, VALIDATE], ids=lambda p: p.name)
def test_bad_setup_fails_before_launch(cluster, script, allocation, message):
    result = cluster.run(script, **{**job(), **allocation})
    assert result.returncode != 0
    assert message in result.stderr
    assert cluster.calls("srun") == []


def test_fit_in_container(cluster):
    sif = cluster.work / "ttc.sif"
    sif.write_bytes(b"")
    result = cluster.run(FIT, "--trainer.max_steps", "7", **job(), TTC_CONTAINER=str(sif))
    assert result.returncode == 0, result.stderr
    args = [*fit_args("1", "1"), "--trainer.max_steps", "7"]
    assert cluster.calls("srun") == [["--kill-on-bad-exit=1", "apptainer", "exec", "--nv", str(sif), "ttc", *args]]
    assert cluster.calls("ttc") == [args]
    assert cluster.calls("scontrol") == []


@pytest.mark.parametrize("container", [False, True], ids=["bare", "container"])
def test_sigusr1_requeue_reaches_scontrol(cluster, container):
    # Inside the container scontrol does not exist, so the request must travel out to the batch shell.
    sif = cluster.work / "ttc.sif"
    sif.write_bytes(b"")
    env = {**job(), "FAKE_SIGUSR1": "1", "TTC_CONTAINER": str(sif) if container else None}
    result = cluster.run(FIT, **env)
    assert result.returncode == 0, result.stderr
    assert cluster.calls("scontrol") == [["requeue", JOB_ID]]


@pytest.mark.parametrize("container", [False, True], ids=["bare", "container"])
def test_validate_command_line(cluster, container):
    sif = cluster.work / "ttc.sif"
    sif.write_bytes(b"")
    env = {**job("ttc-validate", gpus="4", tasks="4"), "TTC_CONTAINER": str(sif) if container else None}
    result = cluster.run(VALIDATE, "--ckpt_path", "runs/ttc-fit/last.ckpt", **env)
    assert result.returncode == 0, result.stderr
    args = [
        "validate", "--config", "configs/patch.yaml", "--trainer.default_root_dir", "runs/ttc-validate",
        "--trainer.num_nodes", "1", "--trainer.devices", "4", "--ckpt_path", "runs/ttc-fit/last.ckpt",
    ]  # fmt: skip
    prefix = ["apptainer", "exec", "--nv", str(sif)] if container else []
    assert cluster.calls("srun") == [["--kill-on-bad-exit=1", *prefix, "ttc", *args]]
    assert cluster.calls("ttc") == [args]


def test_build_runs_from_the_repo_root(cluster):
    result = cluster.run(BUILD, "--fakeroot")
    assert result.returncode == 0, result.stderr
    assert cluster.calls("apptainer") == [["build", "--fakeroot", "ttc.sif", "containers/ttc.def"]]
    assert cluster.read("apptainer.cwd") == str(REPO)


def pins(path: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, version in re.findall(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([0-9][^\s\"\\]*)", path.read_text()):
        key = re.sub(r"[-_.]+", "-", name).lower()
        assert found.setdefault(key, version) == version, f"{path.name} pins {name} twice, differently"
    return found


def test_container_pins_agree_and_cover_the_dependencies():
    tomllib = pytest.importorskip("tomllib")
    apptainer, docker = pins(REPO / "containers" / "ttc.def"), pins(REPO / "containers" / "Dockerfile")
    assert apptainer == docker
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    # The images run Python 3.11: a dependency only older Pythons need (tomli) is not installed there.
    needed = [Requirement(d) for d in dependencies]
    needed = [r for r in needed if r.marker is None or r.marker.evaluate({"python_version": "3.11"})]
    names = {re.sub(r"[-_.]+", "-", r.name).lower() for r in needed}
    assert names <= set(apptainer), f"not pinned in the images: {sorted(names - set(apptainer))}"
    assert apptainer["torch"] == "2.13.0"
