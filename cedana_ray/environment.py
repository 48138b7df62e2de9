"""What environment a workload gets, and keeping secrets out of what we print.

A workload does not inherit the environment of whoever started it (the CLI, the API's
caller): that holds cedana-ray's own keys and cloud credentials, which would then sit in
every checkpoint of the job. It gets a few :data:`DEFAULTS` (``PATH``, ``HOME``, the
locale...) from there, plus what the user gave it (``--env``); with ``inherit`` (``run
process --inherit-env``) the whole environment instead of the defaults, less every
:func:`secret` variable. An explicit ``--env`` always wins, secrets included. On a cluster
the caller's environment goes with the request (``RunRequest.base_env``), not the node
agent's.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

DEFAULTS = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TERM", "TZ", "TMPDIR")
DEFAULTS += ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH")  # so `python` is the caller's Python, with its packages
DEFAULT_PREFIXES = ("LC_",)
# cloud and Ray credentials, whatever they are called; cedana-ray's own keys match SECRET_WORD
SECRET_PREFIXES = ("AWS_", "GOOGLE_", "GCLOUD_", "CLOUDSDK_", "AZURE_", "RAY_AUTH_")
SECRET_WORD = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|AUTH)(_|$)")
# settings named like secrets whose values are not ("token", "disabled", a file's path): redacting
# them would blank the words and paths an error is about
SETTINGS = frozenset({"RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "CEDANA_RAY_AUTH"})
MIN_REDACTED = 4  # shorter values are everywhere in a traceback: hiding them would hide the trace
REDACTED = "***"


def secret(name: str) -> bool:
    """Whether variable ``name`` holds (or points at) a credential or key."""
    upper = name.upper()
    return upper.startswith(SECRET_PREFIXES) or bool(SECRET_WORD.search(upper))


def defaults(source: Mapping[str, str]) -> dict[str, str]:
    """The :data:`DEFAULTS` (and ``LC_*``) that ``source`` sets."""
    return {k: v for k, v in source.items() if k in DEFAULTS or k.startswith(DEFAULT_PREFIXES)}


def workload_env(explicit: Mapping[str, str], inherit: bool, source: Mapping[str, str] | None = None) -> dict[str, str]:
    """A workload's environment: the defaults (or, with ``inherit``, all but the secrets)
    of ``source`` (default: this process's), then ``explicit``."""
    source = os.environ if source is None else source
    base = {k: v for k, v in source.items() if not secret(k)} if inherit else defaults(source)
    return {**base, **explicit}


def redact(text: str, argv: Iterable[str], source: Mapping[str, str] | None = None) -> str:
    """``text`` without the values of secret variables in ``source`` (default: this
    process's environment), of ``--env K=V`` options in ``argv``, or in ``--key-file``s."""
    source = os.environ if source is None else source
    values = [v for k, v in source.items() if secret(k) and k not in SETTINGS] + _argv_secrets(list(argv))
    for value in sorted({v.strip() for v in values if len(v.strip()) >= MIN_REDACTED}, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


def _argv_secrets(argv: list[str]) -> list[str]:
    """The values of ``--env K=V`` and the contents of ``--key-file FILE`` in ``argv``."""
    found = []
    for option, value in _options(argv):
        if option == "--env":
            found.append(value.partition("=")[2])
        elif option == "--key-file":
            found += _file_text(value)
    return found


def _options(argv: list[str]) -> list[tuple[str, str]]:
    """``(option, value)`` of every ``--env`` and ``--key-file``, as ``--option value`` or
    ``--option=value``, in ``argv`` (words after ``--`` too: better too much hidden than too little)."""
    pairs = [word.split("=", 1) for word in argv if word.startswith("--") and "=" in word]
    pairs += [[option, value] for option, value in itertools.pairwise(argv)]
    return [(o, v) for o, v in pairs if o in ("--env", "--key-file")]


def _file_text(path: str) -> list[str]:
    try:
        return [Path(path).read_bytes().decode(errors="replace")]
    except OSError:
        return []
