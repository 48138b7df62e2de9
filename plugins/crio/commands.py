"""``cedana-ray <verb> crio ...``: the crio (CRI) plugin's commands."""

from __future__ import annotations

from cedana_ray.cli.workload import dump_command, manage_command, query_command, restore_command
from cedana_ray.requests import RestoreRequest

NAME = "crio"
WHAT = "the CRI container (CONTAINER_RUNTIME_ENDPOINT)"


@restore_command(NAME, "Restore a CRI checkpoint into the container's pod (as the dumped container, or --jid NEW).")
def restore(request: RestoreRequest) -> RestoreRequest:
    return request


manage = manage_command(NAME, "ID", WHAT)
dump = dump_command(NAME, "ID", WHAT)
query = query_command(
    NAME, ("id", "name", "pod", "image", "state", "jid"), "List the containers of the CRI endpoint with their job."
)
