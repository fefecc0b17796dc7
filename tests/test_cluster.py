"""Cluster configs (validated against KubeRay's CRDs and Ray's launcher schema) and a real multi-node Ray."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from skin_ray.cli import build_parser
from skin_ray.testing import LOCATIONS

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRDS = LOCATIONS.kuberay_schemas
MANIFESTS = {
    "raycluster.yaml": "ray.io_rayclusters.yaml",
    "rayservice.yaml": "ray.io_rayservices.yaml",
    "rayjob-train.yaml": "ray.io_rayjobs.yaml",
    "rayjob-classify.yaml": "ray.io_rayjobs.yaml",
}


@functools.cache
def _crd_validator(crd_file: str, api_version: str) -> jsonschema.protocols.Validator:
    # The CRDs are megabytes of YAML: libyaml's loader where PyYAML has it, once per file; and a validator built
    # once, as jsonschema.validate checks the whole schema itself (1.6 s) on every call.
    crd = yaml.load((CRDS / crd_file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    served = {v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]}
    schema = served[api_version.split("/")[1]]
    return jsonschema.validators.validator_for(schema)(schema)


@pytest.mark.skipif(not CRDS.is_dir(), reason=f"KubeRay CRD schemas not found at {CRDS} (SKIN_RAY_KUBERAY_SCHEMAS sets where)")
@pytest.mark.parametrize("manifest", list(MANIFESTS))
def test_manifest_matches_the_kuberay_crd(manifest):
    document = yaml.safe_load((CLUSTER / manifest).read_text())
    validator = _crd_validator(MANIFESTS[manifest], document["apiVersion"])
    validator.validate(document)
    with pytest.raises(jsonschema.ValidationError):  # the schema does constrain what we validate
        validator.validate({**document, "spec": "not an object"})


def test_launcher_config_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    jsonschema.validate(config, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "max_worker": 3}, schema)


def test_rayservice_serves_the_same_application_as_the_serve_config():
    service = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = yaml.safe_load((ROOT / "deployments" / "serve_config.yaml").read_text())
    assert embedded["applications"] == local["applications"]


def test_rayservice_pods_turn_on_the_serve_fast_path():
    """The same HAProxy/throughput variables `skin-ray serve` sets for a local Ray, in every pod of the service."""
    from skin_ray.runtime import SERVE_ENVIRONMENT

    fast_path = {name: SERVE_ENVIRONMENT[name] for name in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")}
    for container in _containers(yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())):
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert fast_path.items() <= env.items(), container["name"]


def _containers(document: dict) -> list[dict]:
    spec = document["spec"].get("rayClusterSpec") or document["spec"].get("rayClusterConfig") or document["spec"]
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


RESTRICTED = {
    "runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
}


@pytest.mark.parametrize("manifest", list(MANIFESTS))
def test_a_cluster_hands_out_no_keys(manifest):
    """Ray's token auth on; S3 by the pods' service account, no key in any pod; every container unprivileged on
    a read-only root, with /tmp and /dev/shm writable in memory."""
    document = yaml.safe_load((CLUSTER / manifest).read_text())
    spec = document["spec"].get("rayClusterSpec") or document["spec"].get("rayClusterConfig") or document["spec"]
    assert spec["authOptions"] == {"mode": "token"}
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == ("skin-ray-serve" if manifest == "rayservice.yaml" else "skin-ray-jobs")
        assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
        assert {"name": "shm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    for container in _containers(document):
        assert "envFrom" not in container and not [e for e in container.get("env", []) if e["name"].startswith("AWS_")]
        assert RESTRICTED.items() <= container["securityContext"].items(), container["name"]
        assert {"/tmp", "/dev/shm"} <= {mount["mountPath"] for mount in container["volumeMounts"]}
    lines = [line for line in (CLUSTER / manifest).read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]", "\n".join(lines), re.I)


def test_the_service_needs_api_keys_and_ray_ports_are_closed_to_other_pods():
    service = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    pods = [group["template"]["spec"] for group in [service["spec"]["rayClusterConfig"]["headGroupSpec"],
                                                     *service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]]
    for pod, container in zip(pods, _containers(service), strict=True):
        assert {"name": "SKIN_RAY_API_KEYS_FILE", "value": "/etc/skin-ray/api-keys"} in container["env"]
        assert {"name": "api-keys", "secret": {"secretName": "skin-ray-api-keys"}} in pod["volumes"]
    (policy,) = yaml.safe_load_all((CLUSTER / "networkpolicy.yaml").read_text())
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/created-by": "kuberay-operator"}
    ray_ports, service_port = policy["spec"]["ingress"]
    assert "ports" not in ray_ports and service_port["ports"] == [{"protocol": "TCP", "port": 8000}]
    accounts = {d["metadata"]["name"] for d in yaml.safe_load_all((CLUSTER / "serviceaccounts.yaml").read_text())
                if d["kind"] == "ServiceAccount"}
    assert accounts == {"skin-ray-serve", "skin-ray-jobs"}
    launcher = (CLUSTER / "aws.yaml").read_text()
    assert "--dashboard-host=0.0.0.0" not in launcher and "--dashboard-host=127.0.0.1" in launcher


def test_every_image_is_built_on_the_pinned_ray():
    ray_version = version("ray")
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray_version}-" in dockerfile
    for manifest in MANIFESTS:
        document = yaml.safe_load((CLUSTER / manifest).read_text())
        spec = document["spec"].get("rayClusterSpec") or document["spec"].get("rayClusterConfig") or document["spec"]
        assert spec["rayVersion"] == ray_version


def test_the_image_alone_serves_on_every_interface_of_its_exposed_port():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    (exposed,) = re.findall(r"^EXPOSE (\d+)$", dockerfile, re.M)
    (command,) = [json.loads(cmd) for cmd in re.findall(r"^CMD (\[.*\])$", dockerfile, re.M)]
    assert command[0] == "skin-ray"
    args = build_parser().parse_args(command[1:])
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", int(exposed))
    assert f"docker run --rm -p {exposed}:{exposed} " in (CLUSTER / "README.md").read_text()


@pytest.mark.ray
def test_three_jobs_use_both_nodes_of_a_real_two_node_cluster(lesion_tree, untrained_bundle, tmp_path):
    """Training workers on different nodes, classifier actors on both nodes, Serve replicas that follow the load:
    under 12 steady clients each deployment grows from one replica to two, the replicas on both nodes (where each
    goes is Serve's choice: the two SkinModel replicas once shared a node, 0.5 CPU each), and shrinks back to one
    after it, with every request answered 200 all along."""
    result = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "multinode_driver.py"),
            str(lesion_tree),
            str(untrained_bundle),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["nodes"] == 2
    assert len(report["train_nodes"]) == 2, report
    assert len(report["classify_nodes"]) == 2, report
    assert report["classify_rows"] == report["classify_files"] == 240
    scaling = {name: report[name] for name in ("replicas", "model_replica_nodes", "ingress_replica_nodes")}
    assert len(set(report["model_replica_nodes"]) | set(report["ingress_replica_nodes"])) == 2, scaling
    for counts in report["replicas"].values():  # (seconds, running replicas) as the load came and went
        assert max(count for _, count in counts) == 2 and counts[-1][1] == 1, scaling
    assert report["serve_status_codes"] == ["200"] and report["serve_requests"] > 50, report
