"""`make launch`, `make preprocess`, `make mlflow-ui` and the Slurm script.

The launcher commands are read back by the launchers' own argument parsers (torchrun's and DeepSpeed's), so
the tests check what torchrun/DeepSpeed would actually do with them, not our string formatting. Real runs use a
real torchrun with two CPU processes, a real Ray head on loopback, moto's S3 server over HTTP and a real
`mlflow server`; everything binds 127.0.0.1 and is stopped by PID."""
from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap
import urllib.request

import pytest

from servers import LOOPBACK, free_port, stop_process, wait_http

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from launch import env as launch_env  # noqa: E402
from launch import mlflow_ui, preprocess, train  # noqa: E402

CLUSTER_VARS = ("HOSTFILE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "DS_ACCELERATOR",
                "DS_LAUNCHER", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CONFIG", "ARGS", "DRY_RUN", "MAKEFLAGS")


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
    env.update(extra)
    return env


def make(*args, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["make", "-s", "-C", REPO, *args], env=env or clean_env(), capture_output=True,
                          text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def command_of(dry_run_output: str) -> list[str]:
    return shlex.split(dry_run_output.strip().splitlines()[-1])


def torchrun_args(command: list[str]):
    """torchrun's own parser applied to the arguments we would hand it."""
    from torch.distributed.run import get_args_parser

    assert command[1:3] == ["-m", "launch.torchrun"], command   # torchrun's arguments, through our wrapper
    return get_args_parser().parse_args(command[3:])


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: DiG-S/2\n")
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# make launch: the command for 1 node and for 2 nodes


def test_make_launch_one_node_runs_torchrun_standalone_on_cpu(config):
    out = make("launch", f"CONFIG={config}", "DRY_RUN=1", "ARGS=train.steps=3 'run_name=two words'").stdout
    command = command_of(out)
    assert os.path.samefile(command[0], os.path.join(REPO, ".venv", "bin", "python"))
    args = torchrun_args(command)
    assert (args.nnodes, args.nproc_per_node, args.standalone) == ("1", "1", True)
    assert args.module and args.training_script == "dig.cli"
    assert args.training_script_args == ["train", "--config", config, "train.steps=3", "run_name=two words"]
    # No GPU on this machine: the CPU path, and multicast stays off for every rank.
    assert "DS_ACCELERATOR=cpu" in out and "NCCL_NVLS_ENABLE=0" in out


def test_make_launch_two_nodes_torchrun(config):
    env = clean_env(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.5", MASTER_PORT="29555", GPUS_PER_NODE="2")
    args = torchrun_args(command_of(make("launch", f"CONFIG={config}", "DRY_RUN=1", "ARGS=a=1", env=env).stdout))
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "2", 1)
    assert (args.master_addr, args.master_port, args.standalone) == ("10.0.0.5", 29555, False)
    assert args.training_script_args == ["train", "--config", config, "a=1"]


def test_gpu_nodes_use_every_visible_gpu_and_keep_multicast_off(config):
    environ = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "node0", "AWS_SECRET_ACCESS_KEY": "s",
               "NCCL_IB_HCA": "mlx5", "NCCL_NVLS_ENABLE": "1"}
    plan = train.plan_launch(config, ["x=1"], environ=environ, gpu_count=8, python="/py")
    args = torchrun_args(plan.command)
    assert (args.nnodes, args.nproc_per_node, args.node_rank, args.master_port) == ("2", "8", 0, 29500)
    assert "DS_ACCELERATOR" not in plan.env
    # Forwarded as given (an explicit user setting wins), defaults added for the rest.
    assert plan.env["AWS_SECRET_ACCESS_KEY"] == "s" and plan.env["NCCL_IB_HCA"] == "mlx5"
    assert plan.env["NCCL_NVLS_ENABLE"] == "1"
    assert plan.env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and plan.env["NVSHMEM_DISABLE_NVLS"] == "1"
    with pytest.raises(train.LaunchError, match="GPUS_PER_NODE=16 but only 8"):
        train.plan_launch(config, environ={**environ, "GPUS_PER_NODE": "16"}, gpu_count=8)


def test_hostfile_launch_goes_through_deepspeed(config, tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile, parse_args

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=8\n\nnode-b slots=8  # second\nnode-c slots=4\n")
    env = clean_env(HOSTFILE=str(hostfile), NNODES="2", MASTER_ADDR="10.0.0.7", DS_LAUNCHER="openmpi",
                    AWS_ACCESS_KEY_ID="AKIA", MLFLOW_TRACKING_URI="http://mlflow:5000")
    out = make("launch", f"CONFIG={config}", "DRY_RUN=1", "ARGS=train.steps=5", env=env).stdout
    command = command_of(out)
    assert command[1:3] == ["-m", "deepspeed.launcher.runner"]
    args = parse_args(command[3:])
    assert (args.hostfile, args.num_nodes, args.master_addr, args.launcher) == (str(hostfile), 2, "10.0.0.7",
                                                                                 "openmpi")
    assert args.module and args.no_local_rank and args.user_script == "dig.cli"
    assert args.user_args == ["train", "--config", config, "train.steps=5"]
    assert "AWS_ACCESS_KEY_ID=***" in out  # credentials are forwarded but never printed
    # Our hostfile reading agrees with DeepSpeed's own.
    assert train.parse_hostfile(str(hostfile)) == list(fetch_hostfile(str(hostfile)).items())
    assert train.parse_hostfile(os.path.join(REPO, "launch", "hostfile.example")) == \
        list(fetch_hostfile(os.path.join(REPO, "launch", "hostfile.example")).items())


# ---------------------------------------------------------------------------------------------------------------
# Invalid settings fail before anything starts, saying what to set


@pytest.mark.parametrize("settings, message", [
    ({"NNODES": "2", "NODE_RANK": "0"}, "NNODES=2 needs MASTER_ADDR"),
    ({"NNODES": "2", "MASTER_ADDR": "10.0.0.5"}, "NNODES=2 needs NODE_RANK"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 is out of range for NNODES=2"),
    ({"NNODES": "two"}, "NNODES must be an integer, got 'two'"),
    ({"NNODES": "0"}, "NNODES must be >= 1"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT must be <= 65535"),
    ({"HOSTFILE": "/nonexistent/hostfile"}, "hostfile not found: '/nonexistent/hostfile'"),
])
def test_invalid_launch_settings_fail_clearly(config, settings, message):
    proc = make("launch", f"CONFIG={config}", env=clean_env(**settings), check=False)
    assert proc.returncode != 0
    assert f"launch: error: {message}" in proc.stderr
    assert "[launch]" not in proc.stderr  # nothing was started


def test_invalid_hostfiles_and_configs_fail_clearly(config, tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("node-a slots=8\nnode-b 8\n")
    with pytest.raises(train.LaunchError, match=r"bad:2: expected `hostname slots=N`"):
        train.plan_launch(config, environ={"HOSTFILE": str(bad)})
    two = tmp_path / "two"
    two.write_text("node-a slots=8\nnode-b slots=8\n")
    with pytest.raises(train.LaunchError, match="NNODES=3 but hostfile .* lists only 2"):
        train.plan_launch(config, environ={"HOSTFILE": str(two), "NNODES": "3"})
    with pytest.raises(train.LaunchError, match="NODE_RANK is for torchrun mode"):
        train.plan_launch(config, environ={"HOSTFILE": str(two), "NODE_RANK": "0"})
    with pytest.raises(train.LaunchError, match="pdsh"):
        train.plan_launch(config, environ={"HOSTFILE": str(two), "PATH": "/nonexistent"})
    proc = make("launch", env=clean_env(), check=False)
    assert proc.returncode != 0 and "CONFIG is required" in proc.stderr
    proc = make("launch", "CONFIG=/nonexistent.yaml", env=clean_env(), check=False)
    assert proc.returncode != 0 and "training config not found: '/nonexistent.yaml'" in proc.stderr


def test_dry_run_shows_a_hostfile_command_without_pdsh(config, tmp_path, monkeypatch, capsys):
    two = tmp_path / "two"
    two.write_text("node-a slots=8\nnode-b slots=8\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no pdsh on it
    monkeypatch.setenv("HOSTFILE", str(two))
    for name in ("NNODES", "NODE_RANK", "GPUS_PER_NODE", "DS_LAUNCHER"):
        monkeypatch.delenv(name, raising=False)
    assert train.main(["--config", config, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# NOTE: a multi-node HOSTFILE launch uses pdsh" in out and "deepspeed.launcher.runner" in out
    assert train.main(["--config", config]) == 2  # the real launch still refuses, before starting anything
    assert "pdsh" in capsys.readouterr().err


def test_pdsh_check_uses_path(config, tmp_path, monkeypatch):
    two = tmp_path / "two"
    two.write_text("node-a slots=8\nnode-b slots=8\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "pdsh").write_text("#!/bin/sh\n")
    (fake_bin / "pdsh").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_bin))
    plan = train.plan_launch(config, environ={"HOSTFILE": str(two)})
    assert plan.mode == "deepspeed" and plan.remote_env["NCCL_NVLS_ENABLE"] == "0"


# ---------------------------------------------------------------------------------------------------------------
# A real CPU launch: torchrun with 2 gloo processes; every rank sees the forwarded environment

PROBE = """
import json, os, sys
import torch.distributed as dist
dist.init_process_group("gloo")
t = __import__("torch").tensor([dist.get_rank() + 1.0])
dist.all_reduce(t)
keys = ("RANK", "WORLD_SIZE", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_URI", "NCCL_NVLS_ENABLE",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "DS_ACCELERATOR")
record = {k: os.environ.get(k) for k in keys}
record.update(argv=sys.argv[1:], sum=t.item())
with open(os.path.join(os.environ["PROBE_OUT"], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(record, f)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_cpu_launch_runs_two_ranks_with_forwarded_environment(config, tmp_path, monkeypatch):
    (tmp_path / "dig_probe.py").write_text(textwrap.dedent(PROBE))
    monkeypatch.setattr(train, "TRAIN_MODULE", ("dig_probe", "train"))
    environ = clean_env(GPUS_PER_NODE="2", AWS_ACCESS_KEY_ID="AKIAPROBE", MLFLOW_TRACKING_URI="sqlite:///x.db",
                        PROBE_OUT=str(tmp_path), PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1")
    monkeypatch.setattr(os, "environ", environ)
    plan = train.plan_launch(config, ["train.steps=1"], environ=environ)
    assert train.run(plan) == 0
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, rec in enumerate(records):
        assert (rec["RANK"], rec["WORLD_SIZE"]) == (str(rank), "2")
        assert rec["sum"] == 1.0 + 2.0  # both ranks took part in the all-reduce
        assert rec["argv"] == ["train", "--config", config, "train.steps=1"]
        assert (rec["AWS_ACCESS_KEY_ID"], rec["MLFLOW_TRACKING_URI"]) == ("AKIAPROBE", "sqlite:///x.db")
        assert (rec["NCCL_NVLS_ENABLE"], rec["TORCH_SYMM_MEM_DISABLE_MULTICAST"],
                rec["NVSHMEM_DISABLE_NVLS"], rec["DS_ACCELERATOR"]) == ("0", "1", "1", "cpu")


# ---------------------------------------------------------------------------------------------------------------
# Slurm: one task per node, NODE_RANK from each task's SLURM_NODEID, MASTER_ADDR the first host

def test_slurm_script_starts_one_launcher_per_node(config, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # Stand-ins for the two Slurm commands the script uses: scontrol expands the node list, srun runs the task
    # once per node with that node's SLURM_NODEID (what real srun does with --ntasks-per-node=1). The stand-in
    # writes its second host after a pause, as a real scontrol may: a script that stops reading after the first
    # line (`| head -n 1` under pipefail) then always dies of SIGPIPE instead of now and then.
    (bin_dir / "scontrol").write_text("#!/bin/bash\n[[ \"$1 $2\" == 'show hostnames' ]] || exit 1\n"
                                      "echo gpu-a; sleep 0.3; echo gpu-b\n")
    (bin_dir / "srun").write_text(textwrap.dedent("""\
        #!/bin/bash
        while [[ $1 == --* ]]; do shift; done
        for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" > "$OUT_DIR/node$i.txt" || exit 1; done
        """))
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-[a-b]",
                    SLURM_SUBMIT_DIR=REPO, OUT_DIR=str(tmp_path), DRY_RUN="1", GPUS_PER_NODE="4",
                    PY=sys.executable)
    proc = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm.sbatch"), config, "train.steps=7",
                           "name=a b"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for rank in range(2):
        args = torchrun_args(command_of((tmp_path / f"node{rank}.txt").read_text()))
        assert (args.nnodes, args.node_rank, args.master_addr, args.nproc_per_node) == ("2", rank, "gpu-a", "4")
        assert args.training_script_args == ["train", "--config", config, "train.steps=7", "name=a b"]
    proc = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm.sbatch"), config], env=clean_env(),
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "not inside a Slurm allocation" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# make preprocess

def test_preprocess_plan_for_a_cluster(tmp_path, monkeypatch):
    environ = {"RAY_ADDRESS": "head-node:8265", "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s",
               "HF_HOME": "/cache/hf", "PATH": "/usr/bin", "HOME": "/root"}
    plan = preprocess.plan_job(["--resolution", "512"], "s3://b/images", "s3://b/latents", environ=environ)
    assert plan.address == "http://head-node:8265"
    assert plan.entrypoint == ["python", "-m", "data_pipeline", "--input", "s3://b/images", "--output",
                               "s3://b/latents", "--resolution", "512"]
    env_vars = plan.runtime_env["env_vars"]
    assert {k: env_vars[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_HOME")} == \
        {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s", "HF_HOME": "/cache/hf"}
    assert "PATH" not in env_vars and "HOME" not in env_vars
    command = preprocess.submit_command(plan, plan.address, python="/py")
    split = command.index("--")
    assert command[split + 1:] == plan.entrypoint
    assert command[:5] == ["/py", "-m", "ray.scripts.scripts", "job", "submit"]
    opts = dict(zip(command[5:split:2], command[6:split:2]))
    assert opts["--address"] == "http://head-node:8265" and opts["--working-dir"] == REPO
    assert json.loads(opts["--runtime-env-json"])["env_vars"] == env_vars
    # A config inside the checkout is named relative to it (the job's working dir), wherever we call from.
    monkeypatch.chdir(tmp_path)
    with_config = preprocess.plan_job([], config=os.path.join(REPO, "configs", "preprocess", "tiny.yaml"),
                                      environ=environ)
    assert with_config.entrypoint[-2:] == ["--config", os.path.join("configs", "preprocess", "tiny.yaml")]
    # Local paths become absolute: the job runs in an unpacked copy of the working dir.
    local = preprocess.plan_job([], "imgs", "out", environ={})
    assert local.address is None
    assert local.entrypoint[-4:] == ["--input", os.path.abspath("imgs"), "--output", os.path.abspath("out")]


@pytest.mark.parametrize("environ, args, message", [
    ({"RAY_ADDRESS": "ray://head:10001"}, ("--input", "x"), "Ray Client address"),
    ({"RAY_ADDRESS": "auto"}, ("--input", "x"), "give the head's job address"),
    ({}, (), "nothing to preprocess"),
])
def test_preprocess_bad_settings_fail_clearly(environ, args, message):
    proc = make("preprocess", *(f"{k}={v}" for k, v in zip(("INPUT", "OUTPUT"), args[1:])),
                env=clean_env(**environ), check=False)
    assert proc.returncode != 0 and "preprocess: error:" in proc.stderr and message in proc.stderr
    assert "[ray]" not in proc.stderr  # no Ray was started


@pytest.mark.slow
def test_make_preprocess_submits_to_ray_address_with_forwarded_s3_credentials(tmp_path, s3_server, s3_bucket):
    """A Ray head that knows nothing of S3 runs the job: the AWS settings reach it only via the runtime_env."""
    import boto3
    import numpy as np
    from PIL import Image

    from launch.local_ray import local_ray_head
    from ray_cluster import processes_in_group, tcp_listeners

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    rng = np.random.default_rng(0)
    sources = []
    for cls in ("n0_red", "n1_blue"):
        for i in range(3):
            path = tmp_path / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
            s3.upload_file(str(path), s3_bucket, f"images/{cls}/{i}.png")
            sources.append(f"{cls}/{i}.png")
    head_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    saved = os.environ.copy()
    os.environ.clear()
    os.environ.update(head_env)
    try:
        head_cm = local_ray_head(num_cpus=2, object_store_mb=200)
        head = head_cm.__enter__()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        group = {int(line.split()[0]) for line in processes_in_group(head.pid)}
        listeners = tcp_listeners(group)
        assert listeners and all(addr.rsplit(":", 1)[0] in (LOOPBACK, "[::ffff:127.0.0.1]")
                                 for addr, _ in listeners), listeners
        env = clean_env(RAY_ADDRESS=head.dashboard_url, DIG_RAY_PYTHON=sys.executable, **head.auth_env)
        proc = make("preprocess", f"INPUT=s3://{s3_bucket}/images", f"OUTPUT=s3://{s3_bucket}/latents",
                    "ARGS=--vae config:tiny --resolution 32 --min-side 16 --shard-size 4 --encode-batch-size 3",
                    env=env, check=False)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    finally:
        head_cm.__exit__(None, None, None)
    assert not [p for p in processes_in_group(head.pid) if "<defunct>" not in p]
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key="latents/manifest.json")["Body"].read())
    assert sorted(k for shard in manifest["shards"] for k in shard["keys"]) == sorted(sources)
    assert manifest["classes"] == ["n0_red", "n1_blue"] and manifest["resolution"] == 32


# ---------------------------------------------------------------------------------------------------------------
# make mlflow-ui

def test_mlflow_ui_refuses_a_server_uri_and_binds_loopback_only():
    with pytest.raises(mlflow_ui.UIError, match="already a tracking server"):
        mlflow_ui.plan_ui(5000, {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"})
    command, env = mlflow_ui.plan_ui(5001, {})
    assert command[command.index("--host") + 1] == LOOPBACK
    assert command[command.index("--backend-store-uri") + 1] == "sqlite:///mlflow.db"
    assert env == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@pytest.mark.slow
def test_make_mlflow_ui_serves_the_local_store(tmp_path):
    import mlflow

    store = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(store)
    # With a sqlite store the default artifact root is ./mlruns of the working directory: keep it in tmp_path.
    exp_id = mlflow.create_experiment("launch-test", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_metric("loss", 0.25, step=3)
        (tmp_path / "note.txt").write_text("hello")
        mlflow.log_artifact(str(tmp_path / "note.txt"))
    mlflow.set_tracking_uri(None)

    port = free_port()
    env = clean_env(MLFLOW_TRACKING_URI=store)
    log = open(tmp_path / "ui.log", "wb")
    server = subprocess.Popen(["make", "-s", "-C", REPO, "mlflow-ui", f"MLFLOW_PORT={port}"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://{LOOPBACK}:{port}"
        wait_http(base + "/health", timeout=120, proc=server)
        req = urllib.request.Request(base + "/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp_id]}).encode(),
                                     headers={"Content-Type": "application/json"})
        runs = json.loads(urllib.request.urlopen(req, timeout=30).read())["runs"]
        assert [r["info"]["run_id"] for r in runs] == [run.info.run_id]
        assert [(m["key"], m["value"], int(m["step"])) for m in runs[0]["data"]["metrics"]] == [("loss", 0.25, 3)]
        art = urllib.request.urlopen(f"{base}/get-artifact?path=note.txt&run_uuid={run.info.run_id}", timeout=30)
        assert art.read() == b"hello"
        from ray_cluster import processes_in_group, tcp_listeners

        group = {int(line.split()[0]) for line in processes_in_group(server.pid)}
        listeners = tcp_listeners(group)
        assert listeners and {addr for addr, _ in listeners} == {f"{LOOPBACK}:{port}"}
    finally:
        stop_process(server)
        log.close()


def test_forwarded_env_masks_secrets_in_logs():
    env = launch_env.forwarded_env({"AWS_SECRET_ACCESS_KEY": "hunter2", "AWS_REGION": "eu", "PATH": "/bin"})
    text = launch_env.describe(env)
    assert "hunter2" not in text and "AWS_SECRET_ACCESS_KEY=***" in text and "AWS_REGION=eu" in text
    assert "PATH" not in env


def test_allocator_settings_reach_every_rank():
    env = launch_env.forwarded_env({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "PATH": "/bin"})
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True" and "PATH" not in env


def test_ray_cluster_example_passes_rays_own_schema():
    """launch/ray-cluster.yaml is what `ray up` accepts: Ray's defaults merged in, then its JSON schema."""
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(REPO, "launch", "ray-cluster.yaml")) as f:
        config = yaml.safe_load(f)
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    workers = prepared["available_node_types"]["gpu_worker"]
    assert workers["max_workers"] <= prepared["max_workers"]
    # Job entrypoints say `python`: Ray must start from the venv so that `python` is the installed one.
    assert all("$HOME/dig/.venv/bin:$PATH" in " ".join(prepared[k])
               for k in ("head_start_ray_commands", "worker_start_ray_commands"))


@pytest.mark.slow
def test_hostfile_launch_hands_the_environment_to_deepspeeds_pdsh_command(config, tmp_path, monkeypatch):
    """DeepSpeed's real runner, with stand-ins for the two programs that would leave this machine (ssh for its
    reachability check, pdsh for the fan-out): the pdsh command line it builds must export our variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "pdsh").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$PDSH_RECORD"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    environ = clean_env(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", PATH=f"{bin_dir}:{os.environ['PATH']}",
                        AWS_SECRET_ACCESS_KEY="s3cr3t", AWS_ENDPOINT_URL="http://127.0.0.1:9",
                        DIG_NOTE="two words", PDSH_RECORD=str(tmp_path / "pdsh.txt"))
    monkeypatch.setattr(os, "environ", environ)
    plan = train.plan_launch(config, ["steps=3"], environ=environ)
    before = set(os.listdir("/tmp"))
    assert train.run(plan) == 0
    argv = (tmp_path / "pdsh.txt").read_text().splitlines()
    assert argv[argv.index("-w") + 1] == "node-a,node-b"
    remote = " ".join(argv[argv.index("-w") + 2:])
    for expected in ("export AWS_SECRET_ACCESS_KEY=s3cr3t;", "export AWS_ENDPOINT_URL=http://127.0.0.1:9;",
                     "export NCCL_NVLS_ENABLE=0;",
                     "export TORCH_SYMM_MEM_DISABLE_MULTICAST=1;", "export NVSHMEM_DISABLE_NVLS=1;"):
        assert expected in remote, (expected, remote)
    assert remote.endswith(f"dig.cli train --config {config} steps=3")
    # The remote shell reads the exports back as they were set here.
    exports = remote[:remote.index(f"cd {os.getcwd()};")]
    echoed = subprocess.run(["bash", "-c", exports + ' printf "%s|" "$DIG_NOTE" "$AWS_SECRET_ACCESS_KEY"'],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}).stdout
    assert echoed == "two words|s3cr3t|"
    # The credentials file existed only for the launch.
    assert not [n for n in set(os.listdir("/tmp")) - before if n.startswith("dig-launch-env-")]
