"""The Kubernetes manifests and ``mesh k8s inject``, checked without a cluster: Kubernetes'
own schemas (kubernetes-validate, strict, 1.29 and the newest it carries), yamllint, and the
rules no schema checks. tests/system/test_k8s_pods.py runs the pods."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from mesh import __version__
from mesh.cli import build_parser, parse

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
SAMPLES = Path(__file__).with_name("k8s_samples")
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
IMAGE = f"mesh:{__version__}"
# What the downward API gives a pod, for parsing the commands as a container would run them.
DOWNWARD = {"POD_IP": "10.244.1.7", "POD_NAME": "peer-5d9c7f-x2x4q", "POD_NAMESPACE": "mesh"}


def mesh_k8s(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mesh", "k8s", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def inject(path: Path, *args: str) -> list[dict]:
    out = mesh_k8s("inject", str(path), *args)
    assert out.returncode == 0, out.stderr
    return list(yaml.safe_load_all(out.stdout))


def manifest_files() -> list[Path]:
    return sorted(f for f in DEPLOY.glob("*.yaml") if not f.name.startswith("."))


def manifests() -> list[dict]:
    docs = []
    for f in manifest_files():
        if f.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def objects(docs: list[dict]) -> list[dict]:
    out = []
    for d in docs:
        out += d["items"] if d["kind"] == "List" else [d]
    return out


def pods(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, pod spec) of every workload with a pod template."""
    return [
        (d, d["spec"]["template"]["spec"]) for d in objects(docs) if "template" in d.get("spec", {})
    ]


def injected_samples() -> list[dict]:
    docs = []
    docs += inject(SAMPLES / "web.yaml", "--service", "web", "--port", "8080")
    docs += inject(
        SAMPLES / "cache.yaml", "--service", "cache", "--port", "6379", "--image", IMAGE,
        "--mongo-url-secret", "registry:url", "--cluster-dns", "10.0.0.10",
        "--", "--tag", "v7", "--drain", "9", "--admin", "127.0.0.1:9912",
    )  # fmt: skip
    return docs


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return injected_samples()


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {f.name for f in manifest_files()} - {"kustomization.yaml"}


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_and_injected_samples_pass_kubernetes_schemas_strictly(version, samples):
    checked = 0
    for doc in objects(manifests()) + objects(samples):
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 12


def test_yamllint_passes():
    lint = Path(sys.executable).with_name("yamllint")
    out = subprocess.run(
        [lint, "-c", DEPLOY / ".yamllint.yaml", "--strict", DEPLOY, ROOT / "examples" / "k8s"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout


def test_injected_output_passes_yamllint(tmp_path):
    out = mesh_k8s("inject", str(SAMPLES / "web.yaml"), "--service", "web", "--port", "8080")
    (tmp_path / "out.yaml").write_text(out.stdout)
    lint = Path(sys.executable).with_name("yamllint")
    res = subprocess.run(
        [lint, "-c", DEPLOY / ".yamllint.yaml", "--strict", tmp_path / "out.yaml"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout


def test_the_example_app_is_its_plain_deployment_injected():
    plain = ROOT / "examples" / "k8s" / "peer.yaml"
    expected = inject(
        plain, "--service", "peer", "--port", "8000", "--", "--check", "http:/healthz"
    )
    assert [d for d in yaml.safe_load_all((DEPLOY / "peer.yaml").read_text()) if d] == expected


def test_injecting_twice_changes_nothing(tmp_path):
    once = mesh_k8s("inject", str(SAMPLES / "web.yaml"), "--service", "web", "--port", "8080")
    (tmp_path / "once.yaml").write_text(once.stdout)
    twice = mesh_k8s("inject", str(tmp_path / "once.yaml"), "--service", "web", "--port", "8080")
    assert twice.returncode == 0, twice.stderr
    assert twice.stdout == once.stdout
    from_stdin = mesh_k8s("inject", "-", "--service", "web", "--port", "8080", stdin=once.stdout)
    assert from_stdin.stdout == once.stdout


def test_every_pod_with_a_sidecar_follows_the_rules(samples):
    checked = 0
    for workload, pod in pods(manifests()) + pods(samples):
        containers = pod.get("initContainers", []) + pod["containers"]
        ours = [c for c in containers if "sidecar" in c.get("args", [])]
        if not ours:
            continue
        checked += 1
        name = workload["metadata"]["name"]
        # A native sidecar: first of the init containers, restartPolicy Always.
        assert pod["initContainers"][0] is ours[0] and len(ours) == 1, name
        assert ours[0]["restartPolicy"] == "Always", name
        # The sidecar is the first nameserver; the cluster's DNS the second, which the
        # sidecar forwards to (its default upstream: resolv.conf's first that is not itself).
        assert pod["dnsPolicy"] == "None"
        assert pod["dnsConfig"]["nameservers"][0] == "127.0.0.1", name
        assert len(pod["dnsConfig"]["nameservers"]) == 2
        assert "--upstream" not in ours[0]["args"]
        assert pod["dnsConfig"]["searches"][0] == "service.mesh"
        # Port 53 as non-root with no capabilities.
        sysctls = {s["name"]: s["value"] for s in pod["securityContext"]["sysctls"]}
        assert sysctls["net.ipv4.ip_unprivileged_port_start"] == "53"
        sc = ours[0]["securityContext"]
        assert (
            sc["runAsNonRoot"]
            and sc["readOnlyRootFilesystem"]
            and sc["capabilities"]["drop"] == ["ALL"]
        )
        # Probe and preStop ask the sidecar's own admin port, through mesh admin.
        assert ours[0]["startupProbe"]["exec"]["command"][:2] == ["mesh", "admin"]
        assert ours[0]["lifecycle"]["preStop"]["exec"]["command"][-2:] == ["--post", "/drain"]
        # Every app container waits through the drain, or keeps a preStop of its own.
        for c in pod["containers"]:
            assert "preStop" in c.get("lifecycle", {}), (name, c["name"])
        # Address and instance from the downward API.
        env = {e["name"]: e for e in ours[0]["env"]}
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["MESH_ADDRESS"]["value"] == "$(POD_IP)"
        assert env["MESH_INSTANCE"]["value"] == "$(POD_NAME)"
    assert checked == 4  # the example app and the three samples


def test_injection_keeps_what_the_workload_had(samples):
    web = next(d for d in samples if d["kind"] == "Deployment")
    pod = web["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["mesh-sidecar", "migrate"]
    assert pod["containers"][0]["lifecycle"]["preStop"] == {"exec": {"command": ["/app/stop"]}}
    assert pod["containers"][1]["lifecycle"]["preStop"] == {"sleep": {"seconds": 7}}
    assert pod["dnsConfig"]["options"] == [{"name": "ndots", "value": "2"}, {"name": "edns0"}]
    assert pod["dnsConfig"]["searches"][1] == "shop.svc.cluster.local"
    assert next(d for d in samples if d["kind"] == "Service")["spec"]["selector"] == {"app": "web"}
    cache = next(d for d in samples if d["kind"] == "List")["items"]
    sts, ds = cache
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["sysctls"][0] == {"name": "net.core.somaxconn", "value": "1024"}
    assert pod["dnsConfig"]["nameservers"] == ["127.0.0.1", "10.0.0.10"]
    assert pod["dnsConfig"]["searches"][1] == "default.svc.cluster.local"
    side = pod["initContainers"][0]
    assert side["image"] == IMAGE
    assert side["args"][-6:] == ["--tag", "v7", "--drain", "9", "--admin", "127.0.0.1:9912"]
    assert side["startupProbe"]["exec"]["command"] == [
        "mesh",
        "admin",
        "--admin",
        "127.0.0.1:9912",
        "/healthz",
    ]
    assert pod["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": 11}}  # drain 9 + 2
    env = {e["name"]: e for e in side["env"]}
    assert env["MESH_MONGO_URL"]["valueFrom"]["secretKeyRef"] == {"name": "registry", "key": "url"}
    assert ds["spec"]["template"]["spec"]["dnsConfig"]["searches"][1] == "ops.svc.cluster.local"


def _expand(value: str) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: DOWNWARD.get(m.group(1), m.group(0)), value)


def test_every_mesh_command_parses_and_every_mesh_variable_is_read(samples):
    _, commands = build_parser()
    checked = 0
    for _, pod in pods(manifests()) + pods(samples):
        for c in pod.get("initContainers", []) + pod["containers"]:
            if not c["image"].startswith("mesh:"):
                continue
            argv = [*(c.get("command") or []), *(c.get("args") or [])]
            env = {e["name"]: _expand(e.get("value", "x")) for e in c.get("env", [])}
            probes = [
                c.get(p, {}).get("exec", {}).get("command")
                for p in ("startupProbe", "readinessProbe", "livenessProbe")
            ]
            hooks = [c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")]
            for cmd in [argv, *probes, *hooks]:
                if not cmd or cmd[0] == "python":
                    continue
                args = cmd[1:] if cmd[0] == "mesh" else cmd
                command, _, _ = parse([_expand(a) for a in args], env=env)
                readable = {o.env for o in commands[command.name].options} | {
                    "MESH_CONFIG",
                    "MESH_LOG_LEVEL",
                }
                if cmd is argv:
                    ours = {k for k in env if k.startswith("MESH_")}
                    assert ours <= readable, (c["name"], ours - readable)
                checked += 1
    assert checked >= 10


def test_images_ports_and_selectors_agree():
    docs = objects(manifests())
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    workloads = [d for d in docs if "template" in d.get("spec", {})]
    images = {
        c["image"] for _, p in pods(docs) for c in p.get("initContainers", []) + p["containers"]
    }
    assert {i for i in images if i.startswith("mesh")} == {IMAGE}
    assert {i for i in images if i.startswith("mongo")} == {"mongo:7"}
    expose = re.search(r"^EXPOSE (.*)$", (ROOT / "Dockerfile").read_text(), re.M).group(1).split()
    for svc in by_kind["Service"]:
        sel = svc["spec"]["selector"]
        matched = [
            w
            for w in workloads
            if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matched, f"Service {svc['metadata']['name']} selects no pods"
        for w in matched:
            assert sel.items() <= w["spec"]["selector"]["matchLabels"].items()
            ports = {
                p["name"]: p["containerPort"]
                for c in w["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])
            }
            for port in svc["spec"]["ports"]:
                assert port["targetPort"] in ports, (svc["metadata"]["name"], port)
    lb = next(w for w in workloads if w["metadata"]["name"] == "mesh-lb")
    c = lb["spec"]["template"]["spec"]["containers"][0]
    listen = c["args"][c["args"].index("--listen") + 1]
    assert int(listen.rsplit(":", 1)[1]) == c["ports"][0]["containerPort"]
    assert listen.rsplit(":", 1)[1] in expose
    peer = next(w for w in workloads if w["metadata"]["name"] == "peer")
    pod = peer["spec"]["template"]["spec"]
    side, app = pod["initContainers"][0], pod["containers"][0]
    assert side["args"][side["args"].index("--port") + 1] == str(app["ports"][0]["containerPort"])
    assert app["args"][app["args"].index("--port") + 1] == str(app["ports"][0]["containerPort"])
    assert (
        c["args"][c["args"].index("--service") + 1]
        == side["args"][side["args"].index("--service") + 1]
    )
    # The registry URL names every member of the StatefulSet, through its headless Service.
    sts = by_kind["StatefulSet"][0]
    url = by_kind["Secret"][0]["stringData"]["mongo-url"]
    members = [
        f"mongo-{i}.mongo.mesh.svc.cluster.local:27017" for i in range(sts["spec"]["replicas"])
    ]
    assert url == f"mongodb://{','.join(members)}/mesh?replicaSet=rs0"
    assert sts["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["--replSet", "rs0"]
    headless = next(
        s for s in by_kind["Service"] if s["metadata"]["name"] == sts["spec"]["serviceName"]
    )
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert headless["spec"]["ports"][0]["name"] == "mongodb"
    init = by_kind["Job"][0]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert all(m in init[-1] for m in members)


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["inject", "-", "--service", "web", "--port", "80"], "kind: Job\napiVersion: batch/v1\nmetadata: {name: j}\nspec: {}\n", "Job/j: cannot inject a Job"),
        (["inject", str(SAMPLES / "web.yaml"), "--service", "web", "--port", "80", "--", "--mongo-url", "mongodb://x"], None, "sidecar flag --mongo-url: not given here"),
        (["inject", str(SAMPLES / "web.yaml"), "--service", "web", "--port", "80", "--", "--check", "bogus"], None, "--check"),
        (["inject", str(SAMPLES / "web.yaml"), "--port", "80"], None, "--service and --port are required"),
        (["inject", "/nonexistent.yaml", "--service", "web", "--port", "80"], None, "/nonexistent.yaml"),
        (["inject", "-", "--service", "web", "--port", "80"], "a: [b\n", "not YAML"),
        (["inject", "-", "--service", "web", "--port", "80", "--cluster-dns", "kube-dns"], "", "--cluster-dns"),
    ],
)  # fmt: skip
def test_a_mistake_is_one_line_and_exit_2_with_nothing_written(args, stdin, message):
    out = mesh_k8s(*args, stdin=stdin)
    assert out.returncode == 2, out
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_a_pod_with_a_sidecar_named_otherwise_is_refused_whole(tmp_path):
    good = (SAMPLES / "web.yaml").read_text()
    other = (
        (ROOT / "deploy" / "kubernetes" / "peer.yaml")
        .read_text()
        .replace("name: mesh-sidecar", "name: dns")
    )
    out = mesh_k8s("inject", "-", "--service", "web", "--port", "80", stdin=good + "---\n" + other)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == (
        "mesh k8s inject: error: Deployment/peer: container 'dns' already runs mesh sidecar"
        " (injected as 'mesh-sidecar'?)"
    )
