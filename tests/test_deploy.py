"""The Kubernetes manifests build (kustomize), validate against the Kubernetes schema, and agree
with the server: probes on grpc.health.v1, drain time within the termination grace, known options."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ["cpu", "cuda", "single"]


def build(overlay: str) -> list[dict]:
    yaml = pytest.importorskip("yaml")
    kubectl = shutil.which("kubectl") or (str(ROOT / ".tools/bin/kubectl") if (ROOT / ".tools/bin/kubectl").exists() else None)
    if not kubectl:
        pytest.skip("kubectl is not installed (scripts/install_tools.sh fetches Debian's)")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_validate_against_the_kubernetes_schema(overlay, tmp_path):
    pytest.importorskip("kubernetes_validate")
    docs = build(overlay)
    import yaml

    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] != "ServiceMonitor"]))  # a CRD: no schema
    r = subprocess.run([sys.executable, "-m", "kubernetes_validate", "-k", "1.30.0", "--strict", "--quiet", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    kinds = {d["kind"] for d in docs}
    if overlay == "single":  # one pod owns the embedded store: no autoscaler, no disruption budget
        assert {"Deployment", "Service", "PersistentVolumeClaim", "ServiceMonitor"} <= kinds
        assert not kinds & {"HorizontalPodAutoscaler", "PodDisruptionBudget"}
        return
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"} <= kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_agrees_with_the_server(overlay):
    from service.config import load_config

    docs = build(overlay)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    box = pod["containers"][0]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("spkserve-config"))
    cfg_file = Path("/tmp") / f"spkserve-{overlay}.toml"
    cfg_file.write_text(config["data"]["spkserve.toml"])
    cfg = load_config(cfg_file, env={})  # every option in the ConfigMap is a real, valid option
    assert cfg.metrics_host == "0.0.0.0"
    if overlay == "single":  # the embedded store on the claim, one pod at a time
        assert cfg.index_backend == "faiss" and cfg.data_dir == "/data"
        assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
        mount = next(m for m in box["volumeMounts"] if m["mountPath"] == cfg.data_dir)
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    else:
        assert cfg.index_backend == "milvus"
    assert pod["terminationGracePeriodSeconds"] > cfg.shutdown_delay_seconds + cfg.grace_seconds
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert box[probe]["grpc"]["port"] == cfg.port  # grpc.health.v1, the server's overall status
    assert pod["securityContext"]["runAsNonRoot"] and box["securityContext"]["readOnlyRootFilesystem"]
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's user
    entry = next(ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.startswith("ENTRYPOINT"))
    assert '"serve"' in entry and box["args"][:2] == ["--config", "/etc/spkserve/spkserve.toml"]
    if overlay == "single":
        return
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert any(m.get("pods", {}).get("metric", {}).get("name") == "spkserve_batch_queue_depth" for m in hpa["spec"]["metrics"])
    if overlay == "cuda":
        assert box["resources"]["limits"]["nvidia.com/gpu"] == 1 and box["image"].endswith(":cuda")


def test_the_package_data_ships_every_file_of_the_shipped_models():
    """A wheel carries what the repository's entries need (model.json, graphs, cohorts, band maps): a file no
    package-data pattern matches would be missing from an installed server."""
    import fnmatch
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["models"]
    listed = subprocess.run(["git", "ls-files", "models/repository"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: which files are shipped is what git tracks")
    shipped = [f.removeprefix("models/") for f in listed.stdout.split()]
    assert shipped
    missed = [f for f in shipped if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not missed, f"not in [tool.setuptools.package-data] models: {missed}"
