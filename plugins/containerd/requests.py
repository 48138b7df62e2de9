"""What ``run containerd`` asks for: the image, the container id, and what the container
gets besides the image's own settings."""

from __future__ import annotations

from pydantic import BaseModel, Field

from cedana_ray.requests import RunRequest


class BindMount(BaseModel):
    source: str  # a host path
    destination: str  # where it appears in the container
    readonly: bool = False
    recursive: bool = True  # with the mounts under ``source``

    def ctr_option(self) -> str:
        kind, mode = "rbind" if self.recursive else "bind", "ro" if self.readonly else "rw"
        return f"type=bind,src={self.source},dst={self.destination},options={kind}:{mode}"


class ContainerdRunRequest(RunRequest):
    """``run containerd``: the image and the container id, and what the container gets
    besides the image's own settings (``cmd`` only describes it; ``env`` and ``cwd`` are
    the container's)."""

    image: str
    container: str
    snapshotter: str | None = None
    args: list[str] = Field(default_factory=list)  # the command; default the image's
    mounts: list[BindMount] = Field(default_factory=list)
    devices: list[str] = Field(default_factory=list)  # host device nodes, or directories of them

    def ctr_options(self) -> list[str]:
        """The ``ctr run`` options that give the container those but ``env`` (see
        :func:`env_file`); ``gpu``: the NVIDIA device nodes."""
        from cedana_ray import nvml

        devices = [*self.devices, *(nvml.device_nodes() if self.gpu else [])]
        options = [("--cwd", self.cwd)] if self.cwd else []
        options += [("--mount", m.ctr_option()) for m in self.mounts]
        options += [("--device", d) for d in devices]
        options += [("--snapshotter", self.snapshotter)] if self.snapshotter else []
        return [arg for option in options for arg in option]
