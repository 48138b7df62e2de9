"""``cedana-ray slurm setup|destroy``: the files a cluster admin installs.

What this does, and no more: it writes the batch template and a slurm.conf fragment
with the preemption settings our template relies on into a directory, and removes
them again. It does not edit slurm.conf or restart any daemon: the admin adds the
fragment (or includes it) and runs ``scontrol reconfigure``.
"""

from __future__ import annotations

from pathlib import Path

from cedana_ray.errors import NotFoundError, PermissionDenied

from .template import TEMPLATE, template_text

CONF = "slurm.conf.cedana-ray"
CONF_TEXT = """\
# cedana-ray: settings the cedana-ray batch template relies on (`cedana-ray slurm setup`).
# Requeued jobs keep their job id: the restarted batch script restores its workloads.
JobRequeue=1
# Preempted jobs are requeued, not cancelled...
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# ...and first get the job's --signal (USR1 from our template) instead of SIGTERM,
PreemptParameters=send_user_signal
# with this much time to checkpoint (seconds; set it on the preemptable partitions).
# PartitionName=... GraceTime={warning}
# A requeued job waits for its launch credential to expire before it starts again
# (default 120 s): a shorter wait brings the workloads back sooner.
# AuthInfo=cred_expire=30
"""


def install(directory: Path, warning_s: int) -> tuple[list[Path], str]:
    """Write the template and the slurm.conf fragment into ``directory``: (files, fragment)."""
    conf = CONF_TEXT.format(warning=warning_s)
    written = {directory / TEMPLATE: template_text(), directory / CONF: conf}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for path, text in written.items():
            path.write_text(text)
    except PermissionError as exc:
        raise PermissionDenied(f"cannot write into {directory}: {exc.strerror}") from exc
    return list(written), conf


def uninstall(directory: Path) -> list[Path]:
    """Remove what :func:`install` wrote into ``directory``; the removed files."""
    found = [p for p in (directory / TEMPLATE, directory / CONF) if p.exists()]
    if not found:
        hint = "`cedana-ray slurm setup --dir DIR` writes them"
        raise NotFoundError(f"cedana-ray's SLURM files are not in {directory}", hint=hint)
    for path in found:
        path.unlink()
    if not any(directory.iterdir()):
        directory.rmdir()
    return found
