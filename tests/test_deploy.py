"""deploy/: the Kubernetes manifests, the Dockerfile and the README's commands, checked offline.

- Core kinds (ServiceAccount, Role, RoleBinding, ConfigMap, CronJob) and every Ray pod template are
  validated, strictly (unknown fields rejected), against the Kubernetes schemas that
  `kubernetes-validate` ships in its wheel.
- KubeRay's RayCluster, RayJob and RayService have no schema package: they are validated against a
  subset of KubeRay's `ray.io/v1` types written out below, and the fields the jobs and the app rely
  on are checked one by one (GPU placement, replicas, image, credentials from a Secret).
- The RayService's Serve config is validated by Ray Serve's own schema, its import path imported and
  its args checked by the app's builder; no Serve starts.
- Every `python -m jobs.X ...` entrypoint is parsed by the project's own click command, which
  rejects unknown options and missing arguments; no job runs.

No cluster, docker or network: the tests refuse any socket connection.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import re
import shlex
import socket
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MANIFESTS = ("raycluster.yaml", "rayjob-embed.yaml", "cronjob-reembed.yaml", "rayservice.yaml")
IMAGE = "altclip-pipeline:latest"
SECRET = "altclip-s3"
# The oldest Kubernetes checked: 1.27 (CronJob.spec.timeZone is GA there), or the oldest that
# kubernetes-validate still ships; and the newest it ships.
_SHIPPED = [v for v in kubernetes_validate.utils.all_versions() if Version(v) >= Version("1.27")]
K8S_VERSIONS = (_SHIPPED[0], _SHIPPED[-1])
CORE_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Everything here must work offline: any attempt to connect fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"test_deploy tried to open a network connection: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------- loading


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def one(name: str, kind: str) -> dict:
    (doc,) = [d for d in load(name) if d["kind"] == kind]
    return doc


def reembed_rayjob() -> dict:
    """The RayJob that the CronJob creates each night, as held in the ConfigMap."""
    configmap = one("cronjob-reembed.yaml", "ConfigMap")
    (key,) = configmap["data"]
    return yaml.safe_load(configmap["data"][key])


def ray_resources() -> dict[str, dict]:
    """Every KubeRay object that deploy/ creates, by a readable name."""
    return {
        "raycluster.yaml": one("raycluster.yaml", "RayCluster"),
        "rayjob-embed.yaml": one("rayjob-embed.yaml", "RayJob"),
        "cronjob-reembed.yaml ConfigMap": reembed_rayjob(),
        "rayservice.yaml": one("rayservice.yaml", "RayService"),
    }


def cluster_spec(resource: dict) -> dict:
    key = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}.get(resource["kind"])
    return resource["spec"][key] if key else resource["spec"]


def groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group spec) for the head and each worker group."""
    return [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]


def containers(group: dict) -> list[dict]:
    pod = group["template"]["spec"]
    return pod.get("initContainers", []) + pod["containers"]


def gpu_limit(container: dict) -> int:
    resources = container.get("resources", {})
    for section in ("limits", "requests"):
        if "nvidia.com/gpu" in resources.get(section, {}):
            return int(resources[section]["nvidia.com/gpu"])
    return 0


RAY = ray_resources()
CLUSTERS = {name: cluster_spec(r) for name, r in RAY.items()}


# ---------------------------------------------------------------- KubeRay ray.io/v1 (a subset)
# Written from KubeRay's Go types (ray-operator/apis/ray/v1/raycluster_types.go, rayjob_types.go,
# rayservice_types.go),
# fields present since KubeRay 1.1. additionalProperties: false everywhere, so that a misspelt
# field fails here; the API server would prune it without a word. Pod templates are `object` here:
# test_ray_pod_templates_validate checks them against Kubernetes' PodTemplateSpec.


def _obj(properties: dict, required=()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


_STR, _INT, _BOOL, _NUM, _ANY = ({"type": "string"}, {"type": "integer"}, {"type": "boolean"},
                                 {"type": "number"}, {"type": "object"})
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_ARRAY = {"type": "array"}
_HEAD_GROUP = _obj({
    "serviceType": _STR, "headService": _ANY, "enableIngress": _BOOL,
    # map[string]string: `num-gpus: 0` unquoted is an integer, which the API server rejects.
    "rayStartParams": _STR_MAP, "template": _ANY,
}, required=["rayStartParams", "template"])
_WORKER_GROUP = _obj({
    "groupName": _STR, "replicas": _INT, "minReplicas": _INT, "maxReplicas": _INT,
    "numOfHosts": _INT, "rayStartParams": _STR_MAP, "template": _ANY, "scaleStrategy": _ANY,
}, required=["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"])
_AUTOSCALER = _obj({
    "resources": _ANY, "image": _STR, "imagePullPolicy": _STR, "env": _ARRAY, "envFrom": _ARRAY,
    "volumeMounts": _ARRAY, "securityContext": _ANY, "idleTimeoutSeconds": _INT,
    "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
})
_CLUSTER_SPEC = _obj({
    "headGroupSpec": _HEAD_GROUP, "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    "rayVersion": _STR, "enableInTreeAutoscaling": _BOOL, "autoscalerOptions": _AUTOSCALER,
    "headServiceAnnotations": _STR_MAP, "suspend": _BOOL,
}, required=["headGroupSpec"])
_RAYJOB_SPEC = _obj({
    "activeDeadlineSeconds": {"type": "integer", "minimum": 1}, "backoffLimit": _INT,
    "rayClusterSpec": _CLUSTER_SPEC, "submitterPodTemplate": _ANY, "metadata": _STR_MAP,
    "clusterSelector": _STR_MAP, "submitterConfig": _ANY, "entrypoint": _STR,
    "runtimeEnvYAML": _STR, "jobId": _STR,
    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode"]},
    "entrypointResources": _STR, "entrypointNumCpus": _NUM, "entrypointNumGpus": _NUM,
    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
    "shutdownAfterJobFinishes": _BOOL, "suspend": _BOOL,
})
_RAYSERVICE_SPEC = _obj({
    # A Ray Serve config as a YAML string: test_rayservice_serve_config validates what it holds.
    "serveConfigV2": _STR, "rayClusterConfig": _CLUSTER_SPEC, "serveService": _ANY,
    "serviceUnhealthySecondThreshold": _INT, "deploymentUnhealthySecondThreshold": _INT,
}, required=["serveConfigV2", "rayClusterConfig"])
_METADATA = {"type": "object", "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
             "properties": {"labels": _STR_MAP, "annotations": _STR_MAP}}
KUBERAY_SCHEMAS = {
    kind: _obj({"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                "metadata": _METADATA, "spec": spec},
               required=["apiVersion", "kind", "metadata", "spec"])
    for kind, spec in (("RayCluster", _CLUSTER_SPEC), ("RayJob", _RAYJOB_SPEC),
                       ("RayService", _RAYSERVICE_SPEC))
}


def validate_kuberay(resource: dict) -> None:
    jsonschema.Draft202012Validator(KUBERAY_SCHEMAS[resource["kind"]]).validate(resource)


def validate_pod_template(template: dict, version: str) -> None:
    """A Ray group's pod template, as the core kind PodTemplate (whose `template` is a
    PodTemplateSpec), against Kubernetes' strict schema."""
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "ray-group"},
         "template": template},
        version, strict=True,
    )


# ---------------------------------------------------------------- files and schemas


def test_every_manifest_is_checked():
    assert sorted(p.name for p in DEPLOY.glob("*.y*ml")) == sorted(MANIFESTS)
    kinds = {d["kind"] for name in MANIFESTS for d in load(name)}
    assert kinds == CORE_KINDS | {"RayCluster", "RayJob", "RayService"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_kinds_validate(version):
    seen = set()
    for name in MANIFESTS:
        for doc in load(name):
            if doc["apiVersion"].startswith("ray.io/"):
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name} {doc['kind']}: {'.'.join(map(str, e.path))}: {e.message}")
            seen.add(doc["kind"])
    assert seen == CORE_KINDS


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_ray_pod_templates_validate(version):
    for name, spec in CLUSTERS.items():
        for group, g in groups(spec):
            try:
                validate_pod_template(g["template"], version)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name} {group}: template.{'.'.join(map(str, e.path))}: {e.message}")


@pytest.mark.parametrize("name", list(RAY))
def test_kuberay_resources_validate(name):
    validate_kuberay(RAY[name])


def test_validators_reject_mistakes():
    """The validators above do reject: a misspelt field in each kind of object fails."""
    cronjob = copy.deepcopy(one("cronjob-reembed.yaml", "CronJob"))
    cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["comand"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError, match="comand"):
        kubernetes_validate.validate(cronjob, K8S_VERSIONS[0], strict=True)

    template = copy.deepcopy(CLUSTERS["raycluster.yaml"]["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["resource"] = template["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError, match="resource"):
        validate_pod_template(template, K8S_VERSIONS[0])

    cluster = copy.deepcopy(RAY["raycluster.yaml"])
    cluster["spec"]["workerGroupSpecs"][0]["minReplica"] = 1
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        validate_kuberay(cluster)

    job = copy.deepcopy(RAY["rayjob-embed.yaml"])
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'string'"):
        validate_kuberay(job)

    service = copy.deepcopy(RAY["rayservice.yaml"])
    service["spec"]["serveConfig"] = service["spec"].pop("serveConfigV2")
    with pytest.raises(jsonschema.ValidationError, match="serveConfig"):
        validate_kuberay(service)


# ---------------------------------------------------------------- the Ray clusters


def _dockerfile_ray_version() -> str:
    base = dockerfile_base_image()
    match = re.match(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)-", base)
    assert match, f"base image {base}: expected rayproject/ray:X.Y.Z-..."
    return match.group(1)


@pytest.mark.parametrize("name", list(CLUSTERS))
def test_ray_cluster_groups(name):
    spec = CLUSTERS[name]
    assert spec["enableInTreeAutoscaling"] is True
    # One Ray everywhere: the image's, the one KubeRay is told, the one the project accepts.
    assert spec["rayVersion"] == _dockerfile_ray_version()
    ray_req = project_requirement("ray")
    assert ray_req.specifier.contains(spec["rayVersion"]), (spec["rayVersion"], str(ray_req))

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert all(gpu_limit(c) == 0 for c in containers(head)), "the head must not request a GPU"

    workers = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in workers}) == len(workers)
    gpu_groups, cpu_groups = [], []
    for g in workers:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
        assert g["maxReplicas"] >= 1
        gpus = sum(gpu_limit(c) for c in containers(g))
        # Ray must advertise exactly the GPUs Kubernetes gives the pod.
        assert float(g["rayStartParams"].get("num-gpus", "0")) == gpus, g["groupName"]
        (gpu_groups if gpus else cpu_groups).append(g)
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    if RAY[name]["kind"] != "RayService":  # the app's replicas do their own decoding
        assert cpu_groups, "no CPU worker group for decode and preprocessing"
    # The job sizes its actors from the GPUs present at start and refuses --num-gpus without any.
    assert all(g["minReplicas"] >= 1 for g in gpu_groups)

    for group, g in groups(spec):
        for c in g["template"]["spec"]["containers"]:
            assert c["image"] == IMAGE, (group, c["image"])
            limits = c["resources"]["limits"]
            assert {"cpu", "memory"} <= set(limits), (group, "CPU and memory limits: Ray sizes itself by them")
        # Prometheus: every node exports on 8080 (deploy/README.md says so).
        assert g["rayStartParams"]["metrics-export-port"] == "8080", group
        ports = {p["name"]: p["containerPort"] for c in g["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        assert ports.get("metrics") == 8080, group
    head_ports = {p["name"]: p["containerPort"] for c in containers(head) for p in c.get("ports", [])}
    assert head_ports["dashboard"] == 8265 and head_ports["gcs-server"] == 6379


def _all_env(doc) -> list[dict]:
    """Every env entry anywhere in a document (containers, init containers, autoscaler)."""
    found = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "env" and isinstance(value, list):
                found += value
            else:
                found += _all_env(value)
    elif isinstance(doc, list):
        for item in doc:
            found += _all_env(item)
    return found


@pytest.mark.parametrize("name", list(CLUSTERS))
def test_s3_settings_reach_every_ray_container(name):
    for group, g in groups(CLUSTERS[name]):
        for c in g["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                ref = env[var]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == SECRET and ref["key"] and not ref.get("optional"), (group, var)
            for var in ("AWS_ENDPOINT_URL", "AWS_REGION"):
                assert isinstance(env[var]["value"], str) and env[var]["value"], (group, var)


def test_no_secret_value_is_written_down():
    docs = [d for name in MANIFESTS for d in load(name)] + [reembed_rayjob()]
    for entry in _all_env(docs):
        if SECRET_NAME.search(entry["name"]):
            assert "value" not in entry, f"{entry['name']} has a literal value"
            ref = entry["valueFrom"]["secretKeyRef"]
            assert ref["name"] == SECRET, entry["name"]
    assert not [d for d in docs if d["kind"] == "Secret"], "a Secret is created by hand, not shipped"
    for path in DEPLOY.iterdir():
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), path.name
        assert not re.search(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{20,}", text), path.name


# ---------------------------------------------------------------- jobs and entrypoints


def click_command(module: str):
    """The click command behind `python -m MODULE`: `jobs.X` is `altclip X`."""
    from jobs.cli import main

    name = module.removeprefix("jobs.").replace("_", "-")
    return main.get_command(None, name)


def parse_entrypoint(entrypoint: str):
    """Parse `python -m jobs.X ARGS` as the job would, without running it: click checks the
    options, their types and the required arguments. Returns (module, params)."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], entrypoint
    module, args = argv[2], argv[3:]
    spec = importlib.util.find_spec(module)
    if spec is None or click_command(module) is None:
        return module, None
    source = Path(spec.origin).read_text()
    assert 'if __name__ == "__main__":' in source, f"`python -m {module}` would do nothing"
    from jobs.options import CONTEXT

    # With the settings `python -m jobs.X` runs with (see its main()): click keeps the help
    # option of a command's first context, and `-h` would be gone for the tests after this one.
    ctx = click_command(module).make_context(f"python -m {module}", list(args), **CONTEXT)
    return module, ctx.params


def test_embed_rayjob_entrypoint():
    job = RAY["rayjob-embed.yaml"]
    module, params = parse_entrypoint(job["spec"]["entrypoint"])
    assert module == "jobs.embed" and params is not None
    assert params["manifest"] == "s3://corpus/manifest.parquet"
    assert params["out"] == "s3://embeddings/run1"
    assert params["db"] == "s3://tables/db"
    assert params["model"] == "s3://models/altclip/"


def serve_config() -> dict:
    """The RayService's Serve config, as Ray Serve's own schema reads it."""
    from ray.serve.schema import ServeDeploySchema

    text = RAY["rayservice.yaml"]["spec"]["serveConfigV2"]
    return ServeDeploySchema.model_validate(yaml.safe_load(text)).model_dump(exclude_unset=True)


def test_rayservice_serve_config():
    """The Serve config is one Serve takes; its app imports, its builder takes its args, and
    the cluster has room for the most replicas the app scales to."""
    from pipeline.config import ConfigError
    from pipeline.serve import on_ray as serve_ray

    config = serve_config()
    (application,) = config["applications"]
    assert application["route_prefix"] == "/"  # the page's paths are absolute
    module, _, attribute = application["import_path"].partition(":")
    assert getattr(importlib.import_module(module), attribute) is serve_ray.app
    options = serve_ray.parse_options(application["args"])
    # The table the RayJob writes.
    job = parse_entrypoint(RAY["rayjob-embed.yaml"]["spec"]["entrypoint"])[1]
    assert (options.db, options.table) == (job["db"], job["table_name"])
    placed = serve_ray.deployment_options(options)
    gpus = placed["ray_actor_options"]["num_gpus"]
    low, high = options.replica_range()
    assert gpus == 1 and placed["autoscaling_config"]["max_replicas"] == high > low >= 1

    spec = CLUSTERS["rayservice.yaml"]
    gpu_groups = [g for g in spec["workerGroupSpecs"] if float(g["rayStartParams"]["num-gpus"])]
    assert sum(g["maxReplicas"] * float(g["rayStartParams"]["num-gpus"]) for g in gpu_groups) >= high * gpus
    # Every node's HTTP proxy listens on the port the Service routes to (named `serve`).
    port = config["http_options"]["port"]
    assert config["http_options"]["host"] == "0.0.0.0"
    for group, g in groups(spec):
        ports = {p["name"]: p["containerPort"] for c in containers(g) for p in c.get("ports", [])}
        assert ports.get("serve") == port, group

    with pytest.raises(ConfigError, match="`replicas` '0'"):
        serve_ray.parse_options({**application["args"], "replicas": "0"})


def test_parser_rejects_bad_entrypoints():
    import click

    with pytest.raises(click.UsageError):
        parse_entrypoint("python -m jobs.embed s3://corpus/manifest.parquet --no-such-option 1")
    with pytest.raises(click.UsageError):  # --out is required
        parse_entrypoint("python -m jobs.embed s3://corpus/manifest.parquet")
    with pytest.raises(click.BadParameter):
        parse_entrypoint("python -m jobs.embed m.parquet --out o --num-gpus half")


def test_reembed_rayjob_entrypoint():
    job = reembed_rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.reembed"]
    assert argv[3] == "s3://corpus/manifest.parquet" and "--prune" in argv
    assert argv[argv.index("--db") + 1] == "s3://tables/db"
    module, params = parse_entrypoint(job["spec"]["entrypoint"])
    if params is None:
        pytest.skip("jobs.reembed / `altclip reembed` is not in the project yet: "
                    "its entrypoint could not be checked against its parser")
    assert params["db"] == "s3://tables/db" and params["prune"] is True


@pytest.mark.parametrize("job", ["rayjob-embed.yaml", "cronjob-reembed.yaml ConfigMap"])
def test_rayjobs_clean_up_after_themselves(job):
    spec = RAY[job]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert "clusterSelector" not in spec, "a RayJob here brings its own cluster"
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"


def test_cronjob_creates_the_configmap_rayjob():
    docs = {d["kind"]: d for d in load("cronjob-reembed.yaml")}
    cronjob, configmap = docs["CronJob"], docs["ConfigMap"]
    sa, role, binding = docs["ServiceAccount"], docs["Role"], docs["RoleBinding"]

    namespaces = {d["metadata"].get("namespace") for d in docs.values()}
    assert len(namespaces) == 1, f"one namespace for all: {namespaces}"

    assert len(cronjob["spec"]["schedule"].split()) == 5
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container.get("command", []) + container.get("args", [])
    assert command[:3] == ["kubectl", "create", "-f"], command  # create: generateName needs it
    path = Path(command[3])

    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])}
    assert items.get(path.name, path.name) in configmap["data"]

    rayjob = yaml.safe_load(configmap["data"][items.get(path.name, path.name)])
    assert rayjob["kind"] == "RayJob" and rayjob["apiVersion"] == "ray.io/v1"
    assert "generateName" in rayjob["metadata"] and "name" not in rayjob["metadata"]
    # A nightly run must end before the next one starts.
    assert 0 < rayjob["spec"]["activeDeadlineSeconds"] < 24 * 3600

    # RBAC: this pod's ServiceAccount may create RayJobs, in this namespace, and nothing more.
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": sa["metadata"]["name"],
            "namespace": sa["metadata"]["namespace"]} in binding["subjects"]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]


# ---------------------------------------------------------------- Dockerfile


def project_requirement(name: str) -> Requirement:
    """`name`'s requirement in pyproject.toml's dependencies (read as text: Python 3.10 has no
    tomllib)."""
    text = (ROOT / "pyproject.toml").read_text()
    dependencies = text.split("dependencies = [", 1)[1].split("]\n", 1)[0]
    for quoted in re.findall(r'"([^"]+)"', dependencies):
        requirement = Requirement(quoted)
        if requirement.name == name:
            return requirement
    raise AssertionError(f"{name} is not in pyproject.toml's dependencies")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    out = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def dockerfile_args() -> dict[str, str]:
    args = {}
    for instruction, rest in dockerfile_instructions():
        if instruction == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip().strip('"')
    return args


def dockerfile_base_image() -> str:
    froms = [rest for instruction, rest in dockerfile_instructions() if instruction == "FROM"]
    assert len(froms) == 1, froms
    return _expand(froms[0].split()[0], dockerfile_args())


def test_dockerfile():
    base = dockerfile_base_image()
    assert re.fullmatch(r"rayproject/ray(-ml)?:\d+\.\d+\.\d+-py311-(gpu|cu\d+)", base) or \
        re.match(r"nvidia/cuda:[\d.]+-.*runtime", base), f"{base}: not a CUDA base image"

    args = dockerfile_args()
    steps = [(i, _expand(rest, args)) for i, rest in dockerfile_instructions()]
    runs = [rest for i, rest in steps if i == "RUN"]
    torch_step = next((n for n, r in enumerate(runs)
                       if re.search(r"pip install .*torch", r)
                       and re.search(r"--(extra-)?index-url\s+\S*download\.pytorch\.org/whl/cu\d+", r)), None)
    project_step = next((n for n, r in enumerate(runs) if re.search(r"pip install .*\s/app(\s|$)", r)), None)
    assert torch_step is not None, "torch is not installed from PyTorch's CUDA index"
    assert project_step is not None, "the project is not installed (pip install /app)"
    assert torch_step < project_step, "CUDA torch must come first, or pip keeps another torch"
    assert not any("requirements.txt" in r or "whl/cpu" in r for r in runs), "the CPU torch pin"

    copies = [rest for i, rest in steps if i == "COPY"]
    assert any(re.fullmatch(r"(--chown=\S+\s+)?\.\s+/app/?", c) for c in copies), copies
    assert ("WORKDIR", "/app") in steps

    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git"} <= set(ignored)


# ---------------------------------------------------------------- README


def test_readme_commands():
    readme = (DEPLOY / "README.md").read_text()
    for name in MANIFESTS:
        assert f"kubectl apply -f deploy/{name}" in readme
    assert "ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.embed" in readme
    for option in ("--num-gpus", "--batch-size", "--concurrency"):
        assert option in readme
    assert "8080" in readme

    # Each `python -m jobs.X ...` in its code blocks parses with the project's CLI.
    blocks = re.findall(r"```[a-z]*\n(.*?)```", readme, flags=re.S)
    commands = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()
                if "python -m jobs." in line]
    assert commands
    for line in commands:
        module, params = parse_entrypoint("python -m " + line.split("python -m ", 1)[1])
        assert params is not None, f"{module}: no such job"
