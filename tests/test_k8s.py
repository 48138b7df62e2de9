"""The k8s plugin: `k8s setup|destroy`, examples/kuberay, and `query k8s`.

What is real here and what is not: there is NO Kubernetes API server on our machines (no
kube-apiserver, k3s, envtest or kind can be installed), so

- the objects `k8s setup --dry-run` prints, and the pod templates of
  examples/kuberay/raycluster.yaml, are validated offline against the Kubernetes 1.37
  OpenAPI schemas bundled with kubernetes-validate (strict: no unknown fields);
- the apply and delete paths run the real official client against a STAND-IN HTTP server
  (tests/k8s_apiserver.py) that answers with the JSON the client expects and records each
  request, so the test checks what a real server would be sent (kinds, paths, namespaces,
  credentials only in the Authorization header, no secret in any object or argv). The
  stand-in validates nothing: whether a real API server accepts the objects beyond their
  schema (admission, quota, PodSecurity) is untested.

`query k8s` is tested against the real node side: containerd 2.1.9's CRI, started as
tests/test_cri.py starts it, with sandboxes labelled as the kubelet labels them.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from cedana_ray.plugins.crio.client import Cri, messages
from cedana_ray.plugins.k8s.pods import CONTAINER_NAME, POD_NAME, POD_NAMESPACE, POD_UID
from click.testing import CliRunner
from cri_daemons import CGROUP_PARENT
from k8s_apiserver import StandIn, stand_in
from test_cli import assert_one_error, cedana
from test_cri import WHY as CRI_MISSING
from test_cri import count, run_counter
from test_process_criu import wait_for

from cedana_ray import features
from cedana_ray.cli.main import cli
from cedana_ray.engine import Engine
from cedana_ray.errors import PrerequisiteError, UsageError
from cedana_ray.plugins_manager import get_plugin_manager
from cedana_ray.requests import DumpRequest, ManageRequest

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "k8s-test-bearer-7f3c9a"  # distinctive, so a test can look for it
K8S_ROWS = {
    *("Dump command", "Restore command", "Query command", "Helper command(s)"),
    *("Dump middleware", "Dump handler", "Restore middleware", "Restore handler", "Manage handler"),
    *("Custom kill signal", "Custom cleanup", "Custom reaper", "Query handler", "Health checks"),
}
KINDS = ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]


def validate(obj: dict[str, Any]) -> None:
    """Against the newest bundled Kubernetes schema, strict (unknown fields are errors)."""
    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def k8s(*args: str) -> Any:
    """``cedana-ray k8s ARGS --json`` in this process (the client takes seconds to import:
    once here, not in every subprocess); its JSON document."""
    result = CliRunner().invoke(cli, ["k8s", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def dry_run(*args: str) -> list[dict[str, Any]]:
    doc = k8s("setup", "--dry-run", "-o", "json", *args)
    assert doc["kind"] == "List"
    return doc["items"]


def containers(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for o in objs if o["kind"] == "DaemonSet" for c in o["spec"]["template"]["spec"]["containers"]]


def test_dry_run_objects_validate_against_the_kubernetes_schema(home: Path) -> None:
    objs = dry_run("--storage", "s3://ckpts/cluster", "--namespace", "ml", "--image", "registry.example/cr:1")
    assert [o["kind"] for o in objs] == KINDS
    for obj in objs:
        validate(obj)
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] not in ("Namespace", "ClusterRole")} >= {"ml"}
    config = next(o for o in objs if o["kind"] == "ConfigMap")
    assert config["data"]["CEDANA_RAY_STORAGE"] == "s3://ckpts/cluster"
    pod = next(o for o in objs if o["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and pod["serviceAccountName"] == "cedana-ray-node"
    (agent,) = containers(objs)
    assert agent["image"] == "registry.example/cr:1" and agent["securityContext"]["privileged"] is True
    paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert paths == {"/run/containerd/containerd.sock", "/var/lib/cedana-ray", "/var/lib/cedana-ray-staging"}
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert paths <= mounts, "host paths are mounted at the same paths: containerd writes where the agent names"


def test_rbac_is_read_only_pods_and_nodes(home: Path) -> None:
    (role,) = [o for o in dry_run() if o["kind"] == "ClusterRole"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]}]


def test_the_schema_check_bites(home: Path) -> None:
    """A misspelt field fails validation: the validation above is not vacuous."""
    daemon_set = dry_run()[-1]
    daemon_set["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(daemon_set)


def test_dry_run_yaml_is_the_same_objects(home: Path) -> None:
    import yaml

    result = CliRunner().invoke(cli, ["k8s", "setup", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert list(yaml.safe_load_all(result.stdout)) == dry_run()


@pytest.fixture
def api(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    """The stand-in API server, with a kubeconfig for it in KUBECONFIG."""
    with stand_in() as server:
        monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig", TOKEN)))
        yield server


def collection(kind: str, namespace: str) -> str:
    return {
        "Namespace": "/api/v1/namespaces",
        "ServiceAccount": f"/api/v1/namespaces/{namespace}/serviceaccounts",
        "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        "ConfigMap": f"/api/v1/namespaces/{namespace}/configmaps",
        "DaemonSet": f"/apis/apps/v1/namespaces/{namespace}/daemonsets",
    }[kind]


def test_setup_creates_then_replaces_and_destroy_deletes(api: StandIn) -> None:
    created = k8s("setup", "--namespace", "ml", "--storage", "s3://ckpts/x")
    assert [(r["kind"], r["result"]) for r in created] == [(k, "created") for k in KINDS]
    posts = [r for r in api.requests if r.method == "POST"]
    assert [(r.path, r.body["kind"]) for r in posts] == [(collection(k, "ml"), k) for k in KINDS]
    assert all(r.body["metadata"].get("namespace") in (None, "ml") for r in posts)
    assert posts[-1].body == dry_run("--namespace", "ml", "--storage", "s3://ckpts/x")[-1], "what is sent is printed"

    again = k8s("setup", "--namespace", "ml")
    assert [r["result"] for r in again] == ["replaced"] * len(KINDS)
    puts = [r for r in api.requests if r.method == "PUT"]
    assert len(puts) == len(KINDS) and all(r.body["metadata"]["resourceVersion"] for r in puts)
    config = api.objects[f"{collection('ConfigMap', 'ml')}/cedana-ray"]
    assert "CEDANA_RAY_STORAGE" not in config["data"], "a replace is what was asked now"

    assert [r["kind"] for r in k8s("destroy", "--namespace", "ml")] == KINDS[::-1]
    assert api.objects == {}
    assert {r["result"] for r in k8s("destroy", "--namespace", "ml")} == {"absent"}


def test_output_prints_what_was_applied_and_destroy_dry_run_touches_nothing(api: StandIn) -> None:
    result = CliRunner().invoke(cli, ["k8s", "setup", "-o", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["items"] == [r.body for r in api.requests if r.method == "POST"]
    seen = len(api.requests)
    planned = CliRunner().invoke(cli, ["k8s", "destroy", "--dry-run", "-o", "json"])
    assert [o["kind"] for o in json.loads(planned.stdout)["items"]] == KINDS[::-1]
    assert len(api.requests) == seen and len(api.objects) == len(KINDS), "a dry run contacts no server"


def test_credentials_travel_only_in_the_authorization_header(api: StandIn) -> None:
    result = cedana("k8s", "setup", "--storage", "s3://ckpts/x")  # the real entry point, reading KUBECONFIG
    assert result.returncode == 0, result.stderr
    assert {r.authorization for r in api.requests} == {f"Bearer {TOKEN}"}
    sent = json.dumps([r.body for r in api.requests])
    assert TOKEN not in sent
    assert "Secret" not in {r.body["kind"] for r in api.requests if r.body}, "secrets are the admin's, by name"
    objs = [r.body for r in api.requests if r.body]
    for c in containers(objs):
        argv = " ".join(c.get("command", []) + c.get("args", []))
        assert "TOKEN" not in argv.upper() and "AWS_" not in argv and "s3://" not in argv
        assert {"RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY"}.isdisjoint({e["name"] for e in c.get("env", [])})
    refs = {s["secretRef"]["name"] for c in containers(objs) for s in c["envFrom"] if "secretRef" in s}
    assert refs == {"cedana-ray-storage"}


def test_no_api_server_is_one_line(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with stand_in() as server:
        kubeconfig = server.kubeconfig(tmp_path / "kubeconfig", TOKEN)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))  # its server is gone now
    line = assert_one_error(cedana("k8s", "setup"), PrerequisiteError)
    assert "is not reachable" in line and server.url in line
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert "no Kubernetes API server configured" in assert_one_error(cedana("k8s", "destroy"), PrerequisiteError)


def test_bad_options_are_one_line(home: Path) -> None:
    assert "--namespace" in assert_one_error(cedana("k8s", "setup", "--dry-run", "--namespace", "No_Ns"), UsageError)
    assert "--storage" in assert_one_error(cedana("k8s", "setup", "--dry-run", "--storage", "/tmp/x"), UsageError)


def test_without_the_extra_it_says_which(tmp_path: Path, home: Path) -> None:
    """A `kubernetes` that cannot be imported: the command names the k8s extra, the column is ✖."""
    (tmp_path / "kubernetes").mkdir()
    (tmp_path / "kubernetes" / "__init__.py").write_text("raise ImportError('no kubernetes here')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
    argv = [sys.executable, "-m", "cedana_ray.cli", "k8s", "setup", "--dry-run"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert "needs the k8s extra" in assert_one_error(result, PrerequisiteError)


def test_without_a_node_cri_the_column_is_incompatible(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONTAINER_RUNTIME_ENDPOINT", f"unix://{tmp_path}/none.sock")
    matrix = features.compute(get_plugin_manager())
    column = {row: v["k8s"] for row, v in matrix.features.items()}
    assert {row for row, status in column.items() if status == "incompatible"} == K8S_ROWS
    assert any("health check node cri" in e and "none.sock" in e for e in matrix.errors["k8s"])


# -- examples/kuberay/raycluster.yaml
EXAMPLE = ROOT / "examples" / "kuberay" / "raycluster.yaml"


def raycluster() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(EXAMPLE.read_text())


def pod_templates(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = cluster["spec"]
    return {
        "head": spec["headGroupSpec"]["template"],
        **{g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]},
    }


def test_kuberay_pod_templates_validate() -> None:
    """The RayCluster CRD's schema is not bundled with kubernetes-validate: its pod templates
    (core v1 PodTemplateSpecs) are validated as the template of a v1 PodTemplate, and the
    RayCluster's own fields are checked by name (those KubeRay's v1 CRD requires)."""
    cluster = raycluster()
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert {"rayStartParams", "template"} <= set(cluster["spec"]["headGroupSpec"])
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group)
    for name, template in pod_templates(cluster).items():
        validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template})


def test_kuberay_pods_run_cedana_ray_with_the_token_file() -> None:
    cluster = raycluster()
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    for name, template in pod_templates(cluster).items():
        pod = template["spec"]
        assert pod["hostPID"] is True, name
        (container,) = pod["containers"]
        assert container["securityContext"]["privileged"] is True
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        token_dir = os.path.dirname(env["RAY_AUTH_TOKEN_PATH"]["value"])
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == token_dir]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "cedana-ray-auth" and volume["secret"]["defaultMode"] == 0o600
        assert "RAY_AUTH_TOKEN" not in env and not any("AWS_" in n for n in env), "secrets come from Secrets"
        script = " ".join(container["command"] + container["args"])
        assert "KUBERAY_GEN_RAY_START_CMD" in script and "TOKEN" not in script.replace("KUBERAY_GEN_RAY_START_CMD", "")
        check = subprocess.run(["bash", "-n", "-c", container["args"][0]], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    head = pod_templates(cluster)["head"]["spec"]["containers"][0]["args"][0]
    assert "cedana-ray up --address" in head and '--storage "$CEDANA_RAY_STORAGE"' in head


def test_setup_agents_join_the_example_head_by_default(home: Path) -> None:
    cluster = raycluster()
    meta = cluster["metadata"]
    objs = dry_run("--namespace", meta["namespace"])
    (config,) = [o for o in objs if o["kind"] == "ConfigMap"]
    assert config["data"]["RAY_ADDRESS"].startswith(f"{meta['name']}-head-svc.{meta['namespace']}.svc")
    (account,) = [o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"]
    assert pod_templates(cluster)["head"]["spec"]["serviceAccountName"] == account, "the head may list pods"


# -- query k8s: the pods of this node, from containerd 2.1.9's CRI (real, as tests/test_cri.py starts it)
@pytest.fixture
def node(request: pytest.FixtureRequest, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Cri, str]]:
    """The CRI of tests/test_cri.py (containerd 2.1.9, its session fixture ``cri2``) as this
    node's CONTAINER_RUNTIME_ENDPOINT, and its counter image; containers removed afterwards."""
    if CRI_MISSING:
        pytest.skip(str(CRI_MISSING))
    cri, image = request.getfixturevalue("cri2")
    monkeypatch.setenv("CONTAINER_RUNTIME_ENDPOINT", cri.endpoint)
    yield cri, image
    for c in cri.containers():
        cri.remove(c.id)


def kubelet_pod(cri: Cri, image: str, namespace: str, name: str) -> tuple[str, str]:
    """A host-network pod with a counter container, labelled as the kubelet labels them."""
    pb = messages()
    uid = secrets.token_hex(8)
    labels = {POD_NAME: name, POD_NAMESPACE: namespace, POD_UID: uid}
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace),
        labels=labels,
        log_directory=str(Path(cri.target.removeprefix("unix://")).parent / "logs" / name),
    )
    config.linux.security_context.namespace_options.network = pb.NODE
    config.linux.cgroup_parent = CGROUP_PARENT
    pod = cri.run_pod(config)
    container = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="counter"),
        image=pb.ImageSpec(image=image),
        labels={**labels, CONTAINER_NAME: "counter"},
        log_path="counter.log",
    )
    container.linux.security_context.namespace_options.pid = pb.CONTAINER
    cid = cri.create(pod, container, config)
    cri.start(cid)
    wait_for(lambda: count(cri, cid) >= 1, what="the counter counting")
    return pod, cid


@pytest.mark.criu
def test_query_lists_the_kubelets_pods_with_their_jobs(engine: Engine, node: tuple[Cri, str]) -> None:
    cri, image = node
    pod, cid = kubelet_pod(cri, image, "ml", f"trainer-{secrets.token_hex(3)}")
    run_counter(cri, image, "outsider")  # a sandbox the kubelet did not make: not a pod
    engine.manage("crio", ManageRequest(target=cid, jid="k1"))
    ckpt = engine.dump("k1", DumpRequest(leave_running=True)).checkpoint

    pods = [p for p in engine.query("k8s") if p["sandbox"] == pod]
    assert [p["sandbox"] for p in engine.query("k8s")] == [pod], "only the kubelet's pods"
    ((found,),) = [p["containers"] for p in pods]
    assert (pods[0]["namespace"], pods[0]["state"]) == ("ml", "ready")
    assert (found["name"], found["id"], found["state"]) == ("counter", cid, "running")
    assert (found["jid"], found["job_state"], found["last_checkpoint"]) == ("k1", "running", ckpt)

    result = cedana("query", "k8s", "--local", "--no-api", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == engine.query("k8s")
    table = cedana("query", "k8s", "--local", "--no-api").stdout
    assert all(word in table for word in ("ml", pods[0]["name"], "counter", "k1", ckpt))


def api_pod(namespace: str, name: str, uid: str, node: str, containers: dict[str, str | None]) -> dict[str, Any]:
    """A Pod as the API server has it once scheduled: its node, and per container the id the
    kubelet reported (``containerd://ID``), or None for one still waiting for its image."""
    statuses = [
        {"name": c, "image": "counter", "imageID": "", "ready": bool(cid), "restartCount": 0}
        | ({"containerID": f"containerd://{cid}", "state": {"running": {}}} if cid else {"state": {"waiting": {}}})
        for c, cid in containers.items()
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "uid": uid},
        "spec": {"nodeName": node, "containers": [{"name": c, "image": "counter"} for c in containers]},
        "status": {"phase": "Running" if all(containers.values()) else "Pending", "containerStatuses": statuses},
    }


@pytest.mark.criu
def test_query_cluster_wide_joins_the_api_servers_pods_to_the_agents(
    engine: Engine, node: tuple[Cri, str], api: StandIn
) -> None:
    """The API server (the stand-in) lists two pods: the kubelet's pod of this node, whose
    container an agent holds as a job, and one on a node with no agent."""
    cri, image = node
    name = f"trainer-{secrets.token_hex(3)}"
    pod, cid = kubelet_pod(cri, image, "ml", name)
    engine.manage("crio", ManageRequest(target=cid, jid="k2"))
    ((here,),) = [[p for p in engine.query("k8s") if p["sandbox"] == pod]]
    api.add(api_pod("ml", name, here["uid"], "node-a", {"counter": cid}))
    api.add(api_pod("serve", "web", "uid-web", "node-b", {"server": None}))

    result = cedana("query", "k8s", "--local", "--json")  # KUBECONFIG names the API server
    assert result.returncode == 0, result.stderr
    found = {p["name"]: p for p in json.loads(result.stdout)}
    assert set(found) == {name, "web"}
    mine, web = found[name], found["web"]
    assert (mine["node"], mine["agent"], mine["state"]) == ("node-a", "local", "running")
    assert mine["containers"] == [
        {"name": "counter", "id": cid, "image": "counter", "state": "running"}
        | {"jid": "k2", "job_state": "running", "last_checkpoint": None}
    ]
    assert (web["node"], web["agent"], web["state"]) == ("node-b", None, "pending")
    waiting = {"name": "server", "id": None, "image": "counter", "state": "waiting"}
    assert web["containers"] == [waiting | {"jid": None, "job_state": None, "last_checkpoint": None}]
    assert {r.path for r in api.requests} == {"/api/v1/pods"} and {r.authorization for r in api.requests} == {
        f"Bearer {TOKEN}"
    }

    one = json.loads(cedana("query", "k8s", "--local", "-n", "serve", "--json").stdout)
    assert [p["name"] for p in one] == ["web"] and api.requests[-1].path == "/api/v1/namespaces/serve/pods"
    table = cedana("query", "k8s", "--local").stdout
    assert all(word in table for word in ("node", "agent", "node-a", "node-b", "k2", "web", "waiting"))
    node_only = json.loads(cedana("query", "k8s", "--local", "--no-api", "--json").stdout)
    assert pod in {p["sandbox"] for p in node_only} and "web" not in {p["name"] for p in node_only}


def test_query_api_unreachable_is_one_line(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with stand_in() as server:
        kubeconfig = server.kubeconfig(tmp_path / "kubeconfig", TOKEN)
    line = assert_one_error(cedana("query", "k8s", "--local", "--kubeconfig", str(kubeconfig)), PrerequisiteError)
    assert "is not reachable" in line and server.url in line


def test_with_the_node_cri_the_column_works(node: tuple[Cri, str]) -> None:
    matrix = features.compute(get_plugin_manager())
    column = {row: v["k8s"] for row, v in matrix.features.items()}
    assert {row for row, status in column.items() if status == "implemented"} == K8S_ROWS
    assert set(column.values()) == {"implemented", "unimplemented"}
