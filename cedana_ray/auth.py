"""Ray's token authentication for every Ray process cedana-ray starts or connects with.

Whoever reaches an unauthenticated Ray cluster runs code as root on every node, so
``up`` turns Ray's own token authentication on (``RAY_AUTH_MODE=token``) unless told not
to. Ray 2.60 reads the token in each process for itself, and only when that process's
``RAY_AUTH_MODE`` is ``token`` (a ``ray start --address`` or ``ray job submit`` without it
sends none and is refused): from ``RAY_AUTH_TOKEN`` (the token itself), else the file
``RAY_AUTH_TOKEN_PATH`` names (unreadable or empty: the process aborts), else
``~/.ray/auth_token``. Ray's workers inherit their raylet's environment, so the agents,
the job supervisors they start and the entrypoints of ``ray job submit`` have both.

We hand the token on as a file (``RAY_AUTH_TOKEN_PATH``), never as its value: an
environment can end up in argv (a job supervisor's spec) or in a log. Which token:
``RAY_AUTH_TOKEN`` (saved into our file), else the file ``RAY_AUTH_TOKEN_PATH`` names,
else ``ray-auth-token`` in the state dir, created (random, 0600) for a head ``up`` starts.
Single-user machines can opt out: ``up --no-auth``, ``CEDANA_RAY_AUTH=disabled`` or
``RAY_AUTH_MODE=disabled``.

``python -m cedana_ray.auth`` prints the shell ``export`` lines for the same choice, for
batch scripts that start Ray themselves (the SLURM template).
"""

from __future__ import annotations

import os
import secrets
import shlex
import stat
import sys
from pathlib import Path

from .config import RAY_AUTH_MODE as MODE
from .config import paths
from .crypto import write_private
from .errors import CedanaError, PermissionDenied, PrerequisiteError

TOKEN = "RAY_AUTH_TOKEN"
TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
OPT_OUT = "CEDANA_RAY_AUTH"
TOKEN_FILE = "ray-auth-token"


def opted_out() -> bool:
    """Whether the environment turns authentication off (``CEDANA_RAY_AUTH`` or ``RAY_AUTH_MODE``)."""
    return os.environ.get(OPT_OUT) == "disabled" or os.environ.get(MODE) == "disabled"


def default_token_file() -> Path:
    return paths().home / TOKEN_FILE


def token_file(create: bool, known: str | None = None) -> Path:
    """The file holding the token to use: the user's, else ``known`` (an earlier ``up``'s),
    else ours, created when ``create`` (a new head).

    Raises:
        PrerequisiteError: there is none and ``create`` is false (joining a cluster).
        PermissionDenied: the file is not a private regular file with a token in it.
    """
    if value := os.environ.get(TOKEN, "").strip():
        return _write(default_token_file(), value)
    if given := os.environ.get(TOKEN_PATH):
        return _checked(Path(given))
    found = Path(known) if known else default_token_file()
    if found.exists():
        return _checked(found)
    if not create:
        raise PrerequisiteError(
            "no Ray auth token to join the cluster with",
            hint=f"copy the head's {TOKEN_FILE} to {found} (0600) or set {TOKEN_PATH}; `up --no-auth` if it has none",
        )
    return _write(found, secrets.token_hex(32))  # as random as Ray's own `ray get-auth-token --generate`


def _write(path: Path, token: str) -> Path:
    """``token`` into ``path``, 0600, replaced atomically: a reader never sees half a token."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover keeps its mode: start from a new file
    write_private(tmp, token.encode())
    os.replace(tmp, path)
    return path


def _checked(path: Path) -> Path:
    """``path``, absolute, once it is a regular file that only its owner can read, holding a token."""
    refusal = f"refusing Ray auth token file {path}: it must be a non-empty regular file of mode 0600"
    try:
        st = path.stat()  # a symlink is fine (a mounted secret): we only read it
        empty = not path.read_text().strip()
    except OSError as exc:
        raise PermissionDenied(f"{refusal} ({exc.strerror})") from exc
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 or empty:
        raise PermissionDenied(refusal, hint=f"chmod 600 {path}")
    return path.absolute()


def env(token: Path | None) -> dict[str, str]:
    """The environment of a Ray process using ``token`` (None: authentication off)."""
    if token is None:
        return {MODE: "disabled"}
    return {MODE: "token", TOKEN_PATH: str(token)}


def use(token: Path | None) -> None:
    """Make this process, and every one it starts, use ``token`` (None: no authentication).
    Ray caches the mode and the token: a process already connected keeps its own."""
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ.pop(TOKEN, None)  # its value is in the file now; children get the path only
    os.environ.update(env(token))
    if not ray.is_initialized():
        Config.initialize("")  # re-reads RAY_AUTH_MODE
        AuthenticationTokenLoader.instance().reset_cache()


def main() -> None:
    """Print the ``export`` lines of the choice above, creating our token if there is none."""
    try:
        token = None if opted_out() else token_file(create=True)
    except CedanaError as exc:
        sys.exit(f"error: {exc}")
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env(token).items())
    print(f"unset {TOKEN}; export {exports}")


if __name__ == "__main__":
    main()
