"""Is this pod being scaled away, or only restarted? `retire --if-scaled-down` asks at preStop.

A replica that leaves for good must retire (unsubscribe, drain, drop its session), else its
persistent session keeps taking a share of the group's messages that nobody reads. A replica
that is only restarted (rolling update, node drain, eviction) must keep its session. The
StatefulSet controller lowers spec.replicas *before* it deletes the highest ordinals, and
nothing else touches it, so: retire iff this pod's ordinal >= spec.replicas, read from the
scale subresource at the moment the pod is told to stop.

Every failure answers "do not retire". A wrong retire of the last subscriber leaves the group
empty for a moment, and the broker drops what it gets then; a missed retire only strands a
queue that `mqtt-kafka-bridge adopt` can still drain. Stdlib only: it runs in the preStop hook.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_ANSWER_BYTES = 1 << 20  # a Scale object is a few hundred bytes

# NAME-ORDINAL: the StatefulSet's pod names. The ordinal has no leading zero ("mkb-02" is not
# a StatefulSet's pod), so a host name that merely ends in digits is not taken for one.
_POD_NAME = re.compile(r"(?P<name>.+)-(?P<ordinal>0|[1-9][0-9]*)")


@dataclass(frozen=True)
class Decision:
    """Whether to retire, and why (printed by `retire`, so an operator can tell afterwards)."""

    retire: bool
    why: str


def pod_identity(hostname: str, statefulset: str | None = None) -> tuple[str, int]:
    """The StatefulSet name and ordinal in a pod's host name (`mkb-2` -> `("mkb", 2)`).

    `statefulset` (env MKB_STATEFULSET) is for names the last `-` would split wrongly; the host
    name must then be exactly `STATEFULSET-ORDINAL`. Raises ValueError saying what is wrong.
    """
    label = hostname.split(".", 1)[0]  # a host name may come with its domain
    found = _POD_NAME.fullmatch(label)
    if found is None:
        raise ValueError(f"host name {hostname!r} is not a StatefulSet pod's NAME-ORDINAL")
    name, ordinal = found["name"], int(found["ordinal"])
    if statefulset is not None and name != statefulset:
        raise ValueError(f"host name {hostname!r} is not a pod of StatefulSet {statefulset!r}"
                         " (MKB_STATEFULSET)")
    return name, ordinal


def decide(hostname: str, replicas: int, statefulset: str | None = None) -> Decision:
    """The pure decision: retire iff the ordinal is one the StatefulSet no longer wants."""
    try:
        name, ordinal = pod_identity(hostname, statefulset)
    except ValueError as problem:
        return Decision(False, f"{problem}: not retiring")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        return Decision(False, f"spec.replicas {replicas!r} of StatefulSet {name} is not a"
                               " replica count: not retiring")
    if ordinal >= replicas:
        return Decision(True, f"{name}-{ordinal}: ordinal {ordinal} >= spec.replicas"
                              f" {replicas} of StatefulSet {name}: scaled down, retiring")
    return Decision(False, f"{name}-{ordinal}: ordinal {ordinal} < spec.replicas {replicas}"
                           f" of StatefulSet {name}: a restart, the session stays")


def replicas_of(scale: Any) -> int:
    """spec.replicas of a Scale object. The API server omits it when it is 0 (omitempty), so
    an absent field in a `kind: Scale` answer is 0; anything else unexpected is a ValueError."""
    if not isinstance(scale, dict) or not isinstance(scale.get("spec"), dict):
        raise ValueError("the answer has no spec object")
    spec: dict[str, Any] = scale["spec"]
    if "replicas" not in spec and scale.get("kind") == "Scale":
        return 0
    replicas = spec.get("replicas")
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise ValueError(f"spec.replicas is {replicas!r}, not an integer")
    return replicas


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """The API server does not redirect a GET of a scale: a redirect would carry the token."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> None:
        return None


def _api_url(environ: Mapping[str, str]) -> str | None:
    host = environ.get("KUBERNETES_SERVICE_HOST")
    if not host:
        return None
    port = environ.get("KUBERNETES_SERVICE_PORT") or "443"
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def scale_down(environ: Mapping[str, str] = os.environ, hostname: str | None = None,
               service_account: Path = SERVICE_ACCOUNT, timeout: float = 5.0,
               base_url: str | None = None) -> Decision:
    """Ask the API server whether this pod is being scaled away; never raises.

    `base_url` replaces https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT (tests point
    it at a local plain-HTTP server; the CA file is then not needed).
    """
    host = socket.gethostname() if hostname is None else hostname
    try:
        name, _ = pod_identity(host, environ.get("MKB_STATEFULSET") or None)
    except ValueError as problem:
        return Decision(False, f"{problem}: not retiring")
    url = base_url or _api_url(environ)
    if url is None:
        return Decision(False, "not in a Kubernetes cluster (KUBERNETES_SERVICE_HOST is not"
                               " set): not retiring")
    try:
        namespace = environ.get("POD_NAMESPACE") or \
            (service_account / "namespace").read_text().strip()
        token = (service_account / "token").read_text().strip()
    except OSError as problem:
        return Decision(False, f"no service account ({problem}): not retiring")
    if not namespace or not token:
        return Decision(False, f"empty namespace or token in {service_account}: not retiring")
    path = "/apis/apps/v1/namespaces/{}/statefulsets/{}/scale".format(
        urllib.parse.quote(namespace, safe=""), urllib.parse.quote(name, safe=""))
    where = f"StatefulSet {namespace}/{name}"
    # No proxy: the API server is in the cluster, and an HTTPS_PROXY set for the bridge's own
    # traffic would not know it (nor should it see the token).
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({}),
                                                  _NoRedirect()]
    if url.startswith("https:"):
        try:
            context = ssl.create_default_context(cafile=str(service_account / "ca.crt"))
        except (OSError, ssl.SSLError) as problem:
            return Decision(False, f"no cluster CA ({problem}): not retiring")
        handlers.append(urllib.request.HTTPSHandler(context=context))
    request = urllib.request.Request(url.rstrip("/") + path, headers={
        "Authorization": f"Bearer {token}", "Accept": "application/json"})
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=timeout) as answer:
            body = answer.read(MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as problem:
        problem.close()
        hint = {401: "the service account token was refused",
                403: "forbidden: the service account may not get statefulsets/scale (the Role"
                     " and RoleBinding in deploy/kubernetes)",
                404: "not found: no such StatefulSet (MKB_STATEFULSET, POD_NAMESPACE)"}
        return Decision(False, f"GET the scale of {where}: HTTP {problem.code}"
                               f" {hint.get(problem.code, problem.reason)}: not retiring")
    except (OSError, ValueError) as problem:  # URLError, timeouts, refused, TLS, a bad URL
        return Decision(False, f"GET the scale of {where} at {url}: {problem}: not retiring")
    try:
        if len(body) > MAX_ANSWER_BYTES:
            raise ValueError("the answer is larger than a Scale object can be")
        replicas = replicas_of(json.loads(body))
    except ValueError as problem:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return Decision(False, f"the scale of {where}: {problem}: not retiring")
    return decide(host, replicas, environ.get("MKB_STATEFULSET") or None)
