"""deploy/kubernetes passes the API's own schemas and says what the bridge needs, and
bridge.kubernetes tells a scale-down from a restart, here against a stand-in API server (a
local http.server answering as the scale subresource does). No cluster, no servers."""

from __future__ import annotations

import copy
import json
import re
import shlex
import socket
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from bridge import config
from bridge.kubernetes import Decision, decide, pod_identity, replicas_of, scale_down
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
SERVICE_MONITOR_SCHEMA = Path(__file__).parent / "schemas" / "servicemonitor-v1.json"
# The oldest Kubernetes these manifests are meant for, and the newest kubernetes-validate
# (1.37.0, the test extra's pin) has schemas for.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")
RESOURCES = [(path, doc) for path in MANIFESTS for doc in documents(path)]


def resource(kind: str) -> dict[str, Any]:
    [found] = [doc for _, doc in RESOURCES if doc["kind"] == kind]
    return found


def container() -> dict[str, Any]:
    [bridge] = resource("StatefulSet")["spec"]["template"]["spec"]["containers"]
    return bridge


# --- the decision -------------------------------------------------------------------------

NAMES = st.from_regex(r"[a-z]([-a-z0-9]{0,30}[a-z0-9])?", fullmatch=True)


@given(name=NAMES, ordinal=st.integers(0, 10**6), replicas=st.integers(0, 10**6))
def test_a_pod_retires_iff_its_ordinal_is_one_the_statefulset_no_longer_wants(
        name: str, ordinal: int, replicas: int) -> None:
    decision = decide(f"{name}-{ordinal}", replicas)
    assert decision.retire == (ordinal >= replicas), decision
    assert decide(f"{name}-{ordinal}", replicas, statefulset=name) == decision
    assert f"{name}-{ordinal}" in decision.why


@given(hostname=st.one_of(st.text(max_size=40), st.from_regex(r"[a-z.-]{0,8}-[0-9]{1,3}")))
def test_any_host_name_retires_from_zero_replicas_iff_it_is_a_pods_name(hostname: str) -> None:
    try:
        pod_identity(hostname)
    except ValueError:
        pod = False
    else:
        pod = True
    decision = decide(hostname, 0)
    assert decision.retire == pod, decision
    assert decision.why.endswith("retiring")


@pytest.mark.parametrize("hostname", ["mkb", "mkb-", "-2", "mkb-02", "mkb-x", "", "mkb_2",
                                      "mkb-2x", "mkb--"])
def test_a_host_name_that_is_not_name_ordinal_never_retires(hostname: str) -> None:
    with pytest.raises(ValueError):
        pod_identity(hostname)
    assert not decide(hostname, 0).retire


def test_the_name_is_what_comes_before_the_last_dash_unless_mkb_statefulset_says() -> None:
    assert pod_identity("mkb-2") == ("mkb", 2)
    assert pod_identity("my-bridge-10") == ("my-bridge", 10)
    assert pod_identity("mkb-0.mkb.bridges.svc.cluster.local") == ("mkb", 0)
    assert pod_identity("my-bridge-10", "my-bridge") == ("my-bridge", 10)
    with pytest.raises(ValueError, match="MKB_STATEFULSET"):
        pod_identity("other-1", "my-bridge")


@pytest.mark.parametrize("replicas", [-1, True, 2.0, "2", None])
def test_a_replica_count_that_is_not_one_never_retires(replicas: Any) -> None:
    assert not decide("mkb-5", replicas).retire


def test_the_scale_objects_replicas_and_its_omitted_zero() -> None:
    assert replicas_of({"kind": "Scale", "spec": {"replicas": 3}}) == 3
    assert replicas_of({"kind": "Scale", "spec": {}}) == 0  # omitempty: scaled to 0
    for unlike in ({"spec": {}}, {"kind": "Scale"}, {"kind": "Scale", "spec": {"replicas": True}},
                   {"kind": "Scale", "spec": {"replicas": "3"}}, [], "Scale", None):
        with pytest.raises(ValueError):
            replicas_of(unlike)


# --- scale_down against a stand-in API server ----------------------------------------------

class StandIn:
    """An API server's scale subresource, as far as scale_down sees it: it answers every GET
    with `status` and `body`, and keeps what it was asked."""

    def __init__(self) -> None:
        self.status, self.body = 200, b"{}"
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.release = threading.Event()  # a hung server waits for this
        self.hang = False
        self.headers: dict[str, str] = {}
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stand_in.requests.append((self.path, dict(self.headers.items())))
                if stand_in.hang:
                    stand_in.release.wait(30)
                self.send_response(stand_in.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(stand_in.body)))
                for name, value in stand_in.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(stand_in.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def scale(self, replicas: int | None, status: int = 200) -> None:
        spec = {} if replicas is None else {"replicas": replicas}
        self.status = status
        self.body = json.dumps({"kind": "Scale", "apiVersion": "autoscaling/v1",
                                "metadata": {"name": "mkb", "namespace": "bridges"},
                                "spec": spec, "status": {"replicas": 3}}).encode()


@pytest.fixture
def api() -> Iterator[StandIn]:
    stand_in = StandIn()
    thread = threading.Thread(target=stand_in.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield stand_in
    stand_in.release.set()
    stand_in.server.shutdown()
    stand_in.server.server_close()
    thread.join(10)


@pytest.fixture
def account(tmp_path: Path) -> Path:
    """The service-account folder the kubelet mounts (no ca.crt: the stand-in is plain HTTP)."""
    (tmp_path / "token").write_text("t0ken-of-the-pod\n")
    (tmp_path / "namespace").write_text("bridges")
    return tmp_path


def ask(api: StandIn, account: Path, hostname: str = "mkb-2", **environ: str) -> Decision:
    return scale_down(environ=environ, hostname=hostname, service_account=account,
                      timeout=2.0, base_url=api.url)


def test_a_restart_keeps_the_session_and_the_token_is_sent(api: StandIn, account: Path) -> None:
    api.scale(3)
    decision = ask(api, account)
    assert decision == Decision(False, decision.why) and "restart" in decision.why
    [(path, headers)] = api.requests
    assert path == "/apis/apps/v1/namespaces/bridges/statefulsets/mkb/scale"
    assert headers["Authorization"] == "Bearer t0ken-of-the-pod"


def test_a_scale_down_retires(api: StandIn, account: Path) -> None:
    api.scale(2)
    decision = ask(api, account)
    assert decision.retire, decision
    assert "2 >= spec.replicas 2" in decision.why
    api.scale(None)  # scaled to 0: the API server leaves replicas out
    assert ask(api, account, hostname="mkb-0").retire


def test_pod_namespace_and_mkb_statefulset_choose_what_is_asked(
        api: StandIn, account: Path) -> None:
    api.scale(1)
    assert ask(api, account, hostname="my-bridge-1", POD_NAMESPACE="iot",
               MKB_STATEFULSET="my-bridge").retire
    assert api.requests[-1][0] == "/apis/apps/v1/namespaces/iot/statefulsets/my-bridge/scale"


@pytest.mark.parametrize(("status", "said"), [(403, "forbidden"), (401, "token"),
                                              (404, "not found"), (500, "500")])
def test_an_api_error_does_not_retire_and_says_so(api: StandIn, account: Path, status: int,
                                                  said: str) -> None:
    api.status, api.body = status, b'{"kind": "Status", "code": %d}' % status
    decision = ask(api, account)
    assert not decision.retire
    assert f"HTTP {status}" in decision.why and said in decision.why, decision.why


def test_a_redirect_is_not_followed_with_the_token(api: StandIn, account: Path) -> None:
    api.status, api.body = 307, b""
    api.headers = {"Location": f"{api.url}/elsewhere"}  # followed, it would come back here
    decision = ask(api, account)
    assert not decision.retire and "HTTP 307" in decision.why
    assert len(api.requests) == 1


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"kind": "Scale"}',
                                  b'{"spec": {"replicas": "1"}}', b"\xff\xfe",
                                  b" " * (2 << 20)])
def test_an_answer_that_is_not_a_scale_does_not_retire(api: StandIn, account: Path,
                                                       body: bytes) -> None:
    api.status, api.body = 200, body
    assert not ask(api, account).retire


def test_an_unreachable_api_server_does_not_retire(account: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    decision = scale_down(environ={}, hostname="mkb-2", service_account=account,
                          base_url=f"http://127.0.0.1:{port}")
    assert not decision.retire and "not retiring" in decision.why


def test_a_hung_api_server_does_not_retire_once_the_timeout_is_up(
        api: StandIn, account: Path) -> None:
    api.scale(0)
    api.hang = True
    decision = scale_down(environ={}, hostname="mkb-2", service_account=account,
                          timeout=0.3, base_url=api.url)
    assert not decision.retire and "timed out" in decision.why, decision.why


def test_a_proxy_in_the_environment_is_not_used(api: StandIn, account: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The API server is in the cluster: HTTP(S)_PROXY, set for other traffic, is bypassed."""
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    api.scale(2)
    assert ask(api, account).retire


def test_outside_a_cluster_nothing_is_asked_and_nothing_retires(
        api: StandIn, account: Path, tmp_path: Path) -> None:
    decision = scale_down(environ={}, hostname="mkb-2", service_account=account)
    assert not decision.retire and "KUBERNETES_SERVICE_HOST" in decision.why
    empty = tmp_path / "no-account"
    empty.mkdir()
    decision = scale_down(environ={}, hostname="mkb-2", service_account=empty,
                          base_url=api.url)
    assert not decision.retire and "service account" in decision.why
    decision = scale_down(environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1",
                                   "KUBERNETES_SERVICE_PORT": "1"},
                          hostname="mkb-2", service_account=account)
    assert not decision.retire and "CA" in decision.why  # https needs the cluster's CA
    assert not scale_down(environ={}, hostname="laptop", base_url=api.url).retire
    assert api.requests == []


# --- the manifests ------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("path", "doc"), [
    pytest.param(path, doc, id=f"{path.relative_to(DEPLOY)}:{doc['kind']}")
    for path, doc in RESOURCES])
def test_every_manifest_passes_the_kubernetes_schema(path: Path, doc: dict[str, Any],
                                                     version: str) -> None:
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        validate_service_monitor(doc)  # a CRD: kubernetes-validate has no schema for it
    else:
        kubernetes_validate.validate(doc, version, strict=True)


def validate_service_monitor(doc: dict[str, Any]) -> None:
    jsonschema.validate(doc, json.loads(SERVICE_MONITOR_SCHEMA.read_text()))


def test_the_checkers_are_heard() -> None:
    """A misspelt field fails both checks: a pass above means something."""
    statefulset = copy.deepcopy(resource("StatefulSet"))
    statefulset["spec"]["template"]["spec"]["terminationGracePeriod"] = 300
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, KUBERNETES_VERSIONS[0], strict=True)
    monitor = copy.deepcopy(resource("ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        validate_service_monitor(monitor)
    monitor = copy.deepcopy(resource("ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "30 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate_service_monitor(monitor)


def test_the_kustomization_lists_every_manifest_but_the_examples() -> None:
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in DEPLOY.glob("*.yaml")
                                    if p.name != "kustomization.yaml")
    assert (DEPLOY / "examples" / "hpa.yaml").exists()


def test_prestop_retires_only_if_scaled_down_within_the_grace_period() -> None:
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    *fixed, timeout = command
    assert fixed == ["mqtt-kafka-bridge", "retire", "--pid", "1", "--if-scaled-down",
                     "--timeout"]
    grace = resource("StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    shutdown = bridge_config()["bridge"]["shutdown_timeout"]
    # what is left after a retire that timed out is the SIGTERM path's time
    assert timeout == str(int(timeout)) and 0 < int(timeout) < grace
    assert int(timeout) + shutdown < grace


def bridge_config() -> dict[str, Any]:
    return tomllib.loads(resource("ConfigMap")["data"]["bridge.toml"])


def test_the_probes_and_the_scrape_hit_the_port_the_config_listens_on() -> None:
    listen = config.http_listen(bridge_config()["http"]["listen"])
    host, port = listen.host, listen.port
    assert host in ("0.0.0.0", "::")  # the kubelet and Prometheus come from outside the pod
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container()[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == port
    [service_port] = resource("Service")["spec"]["ports"]
    assert ports[service_port["targetPort"]] == port
    [endpoint] = resource("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint == {**endpoint, "port": service_port["name"], "path": "/metrics"}


def test_the_container_reads_the_mounted_config_and_secret() -> None:
    spec = resource("StatefulSet")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    command = container()["command"]
    assert command[:3] == ["mqtt-kafka-bridge", "run", "--config"]
    config_path = Path(command[3])
    [(config_volume, _)] = [(n, v) for n, v in volumes.items() if "configMap" in v]
    assert volumes[config_volume]["configMap"]["name"] == resource("ConfigMap")["metadata"]["name"]
    assert config_path == Path(mounts[config_volume]) / "bridge.toml"
    assert config_path.name in resource("ConfigMap")["data"]
    password = Path(bridge_config()["brokers"][0]["password_file"])
    [(secret_volume, _)] = [(n, v) for n, v in volumes.items() if "secret" in v]
    assert volumes[secret_volume]["secret"]["secretName"] == resource("Secret")["metadata"]["name"]
    assert password.parent == Path(mounts[secret_volume])
    assert password.name in resource("Secret")["stringData"]
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.namespace"}}} in container()["env"]


def test_the_pods_identity_may_read_its_statefulsets_scale_and_nothing_else() -> None:
    statefulset = resource("StatefulSet")
    name = statefulset["metadata"]["name"]
    account = statefulset["spec"]["template"]["spec"]["serviceAccountName"]
    assert account == resource("ServiceAccount")["metadata"]["name"]
    binding, role = resource("RoleBinding"), resource("Role")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account,
                                    "namespace": statefulset["metadata"]["namespace"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert role["rules"] == [{"apiGroups": ["apps"],
                              "resources": ["statefulsets", "statefulsets/scale"],
                              "resourceNames": [name], "verbs": ["get"]}]
    assert statefulset["spec"]["serviceName"] == resource("Service")["metadata"]["name"]
    assert resource("Service")["spec"]["clusterIP"] == "None"


def test_the_pods_run_unprivileged_on_a_read_only_root() -> None:
    pod = resource("StatefulSet")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert not pod.get("shareProcessNamespace")  # else PID 1 is not the bridge
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "memory" in container()["resources"]["limits"]
    assert resource("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_each_replica_has_its_own_session_in_one_share_group() -> None:
    broker = bridge_config()["brokers"][0]
    assert broker["client_id"] == "{hostname}"
    assert bridge_config()["bridge"]["instance"] == "{hostname}"
    assert broker["share_group"] == "mkb"


def test_the_configmaps_config_parses(tmp_path: Path) -> None:
    password = tmp_path / "mqtt-password"
    password.write_text("s3cret\n")
    text = resource("ConfigMap")["data"]["bridge.toml"]
    wanted = bridge_config()["brokers"][0]["password_file"]
    parsed = config.parse(tomllib.loads(text.replace(wanted, str(password))),
                          environ={"POD_NAMESPACE": "bridges"}, hostname="mkb-2")
    [broker] = parsed.brokers
    assert broker.client_id == "mkb-2" and broker.for_lane("fast").client_id == "mkb-2-fast"
    assert parsed.bridge.instance == "mkb-2"
    assert broker.share_group == "mkb"
    assert parsed.http == config.http_listen("0.0.0.0:9108")


def test_the_containerfile_copies_what_pip_install_needs() -> None:
    """It cannot be built here (no Docker, no Podman): at least what it copies exists, and it
    copies every folder pyproject.toml's data-files name."""
    lines = [line for line in CONTAINERFILE.read_text().splitlines()
             if line and not line.startswith("#")]
    copied = [Path(source) for line in lines if line.startswith("COPY ")
              and "--from=" not in line for source in shlex.split(line)[1:-1]]
    for source in copied:
        assert (ROOT / source).exists(), source
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data_files = project["tool"]["setuptools"]["data-files"].values()
    needed = {Path(pattern).parts[0] for files in data_files for pattern in files}
    assert needed | {"bridge", "pyproject.toml", "README.md"} <= {str(p) for p in copied}
    assert 'ENTRYPOINT ["mqtt-kafka-bridge"]' in lines
    [user] = [line for line in lines if line.startswith("USER ")]
    uid = resource("StatefulSet")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert re.fullmatch(rf"USER {uid}(:{uid})?", user)
    assert "mqtt-kafka-bridge" in project["project"]["scripts"]
