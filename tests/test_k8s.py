"""deploy/k8s: every manifest validates against the Kubernetes OpenAPI schemas shipped inside the
`kubernetes-validate` package (strict: unknown fields are errors; no network, no cluster), and the facts the
system relies on hold: the Indexed Job's shard comes from JOB_COMPLETION_INDEX, GPUs are requested, probes hit
the health routes, the HPA and Service point at the Deployment, Redis persists, the store is read-only to the API.
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate  # a dev dependency: the schemas ship inside the package
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33"  # oldest release where everything used here is GA (Job backoffLimitPerIndex)


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


DOCS = _documents()


def _one(kind: str, name: str) -> dict:
    found = [d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_manifests_exist():
    kinds = sorted({d["kind"] for _, d in DOCS})
    assert {"Job", "Deployment", "Service", "HorizontalPodAutoscaler", "StatefulSet",
            "PersistentVolumeClaim"} <= set(kinds), kinds


@pytest.mark.parametrize("source, doc", DOCS, ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS])
def test_manifest_validates_against_the_kubernetes_schema(source, doc):
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{source}: {doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")


def test_the_schema_check_catches_mistakes():
    """The validator is live: a misspelt field and a wrong type in our own Deployment are rejected."""
    deployment = _one("Deployment", "sglora-api")
    typo = yaml.safe_load(yaml.safe_dump(deployment))
    typo["spec"]["replica"] = 2
    wrong_type = yaml.safe_load(yaml.safe_dump(deployment))
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_indexed_job_shards_by_job_completion_index_and_requests_a_gpu():
    job = _one("Job", "sglora-build-experts")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    command = _container(job)["command"]
    assert command[:4] == ["python", "-m", "offline", "train-experts"]
    assert "--shard" not in command, "the shard must come from JOB_COMPLETION_INDEX, which --shard reads"
    assert int(command[command.index("--num-shards") + 1]) == spec["completions"]
    assert float(command[command.index("--task-gpus") + 1]) > 0, "experts train on the pod's GPU"
    resources = _container(job)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    # Steps run in order: prepare (once) -> experts (sharded) -> finalize; all on the same store.
    prepare = _container(_one("Job", "sglora-build-prepare"))["command"]
    finalize = " ".join(_container(_one("Job", "sglora-build-finalize"))["command"])
    assert prepare[3] == "prepare" and "build-library" in finalize and "train-cvae" in finalize
    out = command[command.index("--out") + 1]
    assert prepare[prepare.index("--out") + 1] == out and f"--out {out}" in finalize


def test_api_deployment_gpu_probes_store_and_redis():
    deployment = _one("Deployment", "sglora-api")
    api = _container(deployment)
    assert api["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert api["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert api["startupProbe"]["httpGet"]["path"] == "/health/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health/live"
    env = {e["name"]: e.get("value") for e in api["env"]}
    assert float(env["SGLORA_STORE_WATCH_S"]) > 0, "replicas follow the shared store's version pointer"
    redis_host = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", env["SGLORA_REDIS_URL"])
    assert redis_host, env["SGLORA_REDIS_URL"]
    redis_service = _one("Service", redis_host.group(1))
    assert int(redis_host.group(2)) in [p["port"] for p in redis_service["spec"]["ports"]]
    mounts = {m["name"]: m for m in api["volumeMounts"]}
    store_mount = next(m for m in mounts.values() if env["SGLORA_STORE_PATH"].startswith(m["mountPath"]))
    assert store_mount["readOnly"] is True
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == store_mount["name"])
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    # The build jobs write the same claim the API reads.
    job = _one("Job", "sglora-build-experts")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert volume["persistentVolumeClaim"]["claimName"] in claims
    assert _one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])["spec"]["accessModes"] == [
        "ReadWriteMany"]


def test_service_and_hpa_point_at_the_api_pods():
    deployment = _one("Deployment", "sglora-api")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = _one("Service", "sglora-api")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ("http", 8000)
    hpa = _one("HorizontalPodAutoscaler", "sglora-api")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "sglora-api")
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"], "replicas: at least two, room to scale"


def test_redis_persists_with_aof_on_a_volume():
    redis = _one("StatefulSet", "sglora-redis")
    args = _container(redis)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    data_dir = args[args.index("--dir") + 1]
    mount = next(m for m in _container(redis)["volumeMounts"] if m["mountPath"] == data_dir)
    templates = {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    assert mount["name"] in templates, "AOF lives on a persistent volume claim"
    assert _container(redis)["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
