"""What ``cedana-ray k8s setup`` installs, as typed ``kubernetes.client`` objects.

One node agent per Kubernetes node (a DaemonSet) that joins the Ray cluster as a Ray node,
so that ``cedana-ray up`` on the head gives it a cedana-ray agent. It runs privileged in the
host's PID namespace (CRIU, and the PIDs the CRI reports are host PIDs), with containerd's
socket (the ``crio`` plugin's CRI endpoint), the state dir and the staging dir mounted from
the host at the same paths: containerd writes a checkpoint archive at the path the agent
names, which must mean the same file on both sides. Settings come from a ConfigMap; the Ray
auth token and the store's credentials from Secrets the admin creates (never argv, never
in these objects). The RBAC is read-only: pods and nodes.

Imported only by the ``k8s`` commands: the client takes seconds to import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubernetes import client as k

NAME = "cedana-ray"
AGENT = "cedana-ray-node"
DEFAULT_NAMESPACE = "cedana-ray"
DEFAULT_IMAGE = "localhost/cedana-ray:latest"  # what `make image` (scripts/build-image.sh) tags
AUTH_SECRET = "cedana-ray-auth"  # key `token`: the Ray cluster's auth token
STORAGE_SECRET = "cedana-ray-storage"  # env of the store's credentials (AWS_*, GOOGLE_*), optional
TOKEN_DIR = "/etc/cedana-ray/auth"
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
STATE_DIR = "/var/lib/cedana-ray"
STAGING_DIR = "/var/lib/cedana-ray-staging"
RAY_PORT = 6379
LABELS = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/managed-by": "cedana-ray"}


@dataclass(frozen=True)
class Settings:
    """What ``k8s setup`` is asked for."""

    namespace: str = DEFAULT_NAMESPACE
    storage: str | None = None
    image: str = DEFAULT_IMAGE
    ray_address: str | None = None  # default: the head service of examples/kuberay's RayCluster

    @property
    def address(self) -> str:
        return self.ray_address or f"{NAME}-head-svc.{self.namespace}.svc.cluster.local:{RAY_PORT}"

    @property
    def cluster_name(self) -> str:
        """Cluster-scoped objects carry the namespace: two installs must not share them."""
        return f"{AGENT}-{self.namespace}"


def _meta(name: str, namespace: str | None = None) -> k.V1ObjectMeta:
    return k.V1ObjectMeta(name=name, namespace=namespace, labels=dict(LABELS))


def namespace(s: Settings) -> k.V1Namespace:
    return k.V1Namespace(api_version="v1", kind="Namespace", metadata=_meta(s.namespace))


def service_account(s: Settings) -> k.V1ServiceAccount:
    return k.V1ServiceAccount(api_version="v1", kind="ServiceAccount", metadata=_meta(AGENT, s.namespace))


def cluster_role(s: Settings) -> k.V1ClusterRole:
    """Read pods and nodes; nothing else."""
    rule = k.V1PolicyRule(api_groups=[""], resources=["pods", "nodes"], verbs=["get", "list", "watch"])
    return k.V1ClusterRole(
        api_version="rbac.authorization.k8s.io/v1", kind="ClusterRole", metadata=_meta(s.cluster_name), rules=[rule]
    )


def cluster_role_binding(s: Settings) -> k.V1ClusterRoleBinding:
    return k.V1ClusterRoleBinding(
        api_version="rbac.authorization.k8s.io/v1",
        kind="ClusterRoleBinding",
        metadata=_meta(s.cluster_name),
        role_ref=k.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=s.cluster_name),
        subjects=[k.RbacV1Subject(kind="ServiceAccount", name=AGENT, namespace=s.namespace)],
    )


def settings_data(s: Settings) -> dict[str, str]:
    """The ConfigMap's data: the agent's environment (no secret in it)."""
    data = {
        "RAY_ADDRESS": s.address,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": f"{TOKEN_DIR}/token",
        "CEDANA_RAY_HOME": STATE_DIR,
        "CEDANA_RAY_STAGING": STAGING_DIR,
        "CONTAINER_RUNTIME_ENDPOINT": f"unix://{CONTAINERD_SOCKET}",
    }
    if s.storage:
        data["CEDANA_RAY_STORAGE"] = s.storage
    return data


def config_map(s: Settings) -> k.V1ConfigMap:
    return k.V1ConfigMap(api_version="v1", kind="ConfigMap", metadata=_meta(NAME, s.namespace), data=settings_data(s))


def _host_path(name: str, path: str, kind: str) -> tuple[k.V1Volume, k.V1VolumeMount]:
    """A host path mounted at the same path in the container."""
    volume = k.V1Volume(name=name, host_path=k.V1HostPathVolumeSource(path=path, type=kind))
    return volume, k.V1VolumeMount(name=name, mount_path=path)


def _volumes() -> tuple[list[k.V1Volume], list[k.V1VolumeMount]]:
    pairs = [
        _host_path("containerd-socket", CONTAINERD_SOCKET, "Socket"),
        _host_path("state", STATE_DIR, "DirectoryOrCreate"),
        _host_path("staging", STAGING_DIR, "DirectoryOrCreate"),
    ]
    token = k.V1SecretVolumeSource(secret_name=AUTH_SECRET, default_mode=0o600)
    pairs.append((k.V1Volume(name="auth", secret=token), k.V1VolumeMount(name="auth", mount_path=TOKEN_DIR)))
    return [v for v, _ in pairs], [m for _, m in pairs]


def agent_container(s: Settings, mounts: list[k.V1VolumeMount]) -> k.V1Container:
    """``ray start --address $(RAY_ADDRESS) --block``: a Ray node, on which the cluster's
    coordinator starts a cedana-ray agent (Kubernetes expands ``$(RAY_ADDRESS)`` from the
    ConfigMap; the token is read from its file)."""
    node = k.V1EnvVar(
        name="NODE_NAME", value_from=k.V1EnvVarSource(field_ref=k.V1ObjectFieldSelector(field_path="spec.nodeName"))
    )
    return k.V1Container(
        name="agent",
        image=s.image,
        command=["ray"],
        # no CPUs for Ray: nothing but the agent (an actor of 0 CPUs) is placed on this Ray node
        args=["start", "--address=$(RAY_ADDRESS)", "--num-cpus=0", "--block", "--disable-usage-stats"],
        env=[node],
        env_from=[
            k.V1EnvFromSource(config_map_ref=k.V1ConfigMapEnvSource(name=NAME)),
            k.V1EnvFromSource(secret_ref=k.V1SecretEnvSource(name=STORAGE_SECRET, optional=True)),
        ],
        security_context=k.V1SecurityContext(privileged=True),
        volume_mounts=mounts,
        resources=k.V1ResourceRequirements(requests={"cpu": "100m", "memory": "512Mi"}),
    )


def daemon_set(s: Settings) -> k.V1DaemonSet:
    volumes, mounts = _volumes()
    selector = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/component": "node-agent"}
    pod = k.V1PodSpec(
        service_account_name=AGENT,
        host_pid=True,
        containers=[agent_container(s, mounts)],
        volumes=volumes,
        tolerations=[k.V1Toleration(operator="Exists")],  # every node, tainted ones too
    )
    template = k.V1PodTemplateSpec(metadata=k.V1ObjectMeta(labels={**LABELS, **selector}), spec=pod)
    return k.V1DaemonSet(
        api_version="apps/v1",
        kind="DaemonSet",
        metadata=_meta(AGENT, s.namespace),
        spec=k.V1DaemonSetSpec(selector=k.V1LabelSelector(match_labels=selector), template=template),
    )


def objects(s: Settings) -> list[Any]:
    """Everything ``k8s setup`` applies, in the order it applies them."""
    return [
        namespace(s),
        service_account(s),
        cluster_role(s),
        cluster_role_binding(s),
        config_map(s),
        daemon_set(s),
    ]


def plain(objs: list[Any]) -> list[dict[str, Any]]:
    """The objects as the API's JSON (camelCase keys, no nulls)."""
    return k.ApiClient().sanitize_for_serialization(objs)
