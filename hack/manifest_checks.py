#!/usr/bin/env python3
"""Offline checks of the Kubernetes manifests, used by hack/validate-manifests.sh.

Subcommands (each exits non-zero on the first kind of failure it finds and
says what it checked):

  split RENDERED OUTDIR        split `helm template` output into
                               OUTDIR/kubernetes.yaml (built-in kinds) and one
                               file per custom resource (OUTDIR/cr-<kind>-<n>.yaml)
  crd-schema CRD OUT           turn the CRD's openAPIV3Schema into a strict
                               draft-07 JSON schema for check-jsonschema
  crd-sync CHART_CRD REPO_CRD  the chart's CRD copy equals the generated one
  promql-rules OUT FILE...     gather every PromQL expression of Grafana
                               dashboards (JSON) and PrometheusRules (YAML) into a
                               rules file for `promtool check rules`
  prometheusrule-groups OUT FILE...
                               the spec.groups of every PrometheusRule, as a
                               plain Prometheus rules file
  dockerfiles CONTEXT DOCKERFILE...
                               stages, COPY sources present and not excluded by
                               .dockerignore, every Cargo workspace member in context
  tiltfile TILTFILE HELM [NAME=VALUE...]
                               evaluate the Tiltfile with stub Tilt built-ins
                               and the given `tilt up -- --NAME` settings

Needs PyYAML; `tiltfile` also needs starlark-pyo3.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

BLOB_KEY = "__tilt_blob__"

# API groups whose kinds the Kubernetes JSON schemas know; anything else is a
# custom resource that needs its own schema.
CUSTOM_GROUPS = ("monitoring.coreos.com", "pingmesh.io")


class CheckError(Exception):
    """A failed check, printed without a traceback."""


def load_documents(path: Path) -> list[dict]:
    docs = []
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is None:
            continue
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise CheckError(f"{path}: a document without apiVersion/kind: {str(doc)[:80]}")
        docs.append(doc)
    return docs


# ---------------------------------------------------------------- split


def cmd_split(rendered: str, outdir: str) -> None:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    docs = load_documents(Path(rendered))
    builtin, seen, counts = [], set(), {}
    for doc in docs:
        meta = doc.get("metadata") or {}
        key = (doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta.get("name", ""))
        if key in seen:
            raise CheckError(f"{rendered}: duplicate object {key}")
        seen.add(key)
        counts[doc["kind"]] = counts.get(doc["kind"], 0) + 1
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
        if group in CUSTOM_GROUPS:
            index = sum(1 for _ in out.glob(f"cr-{doc['kind'].lower()}-*.yaml"))
            (out / f"cr-{doc['kind'].lower()}-{index}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        else:
            builtin.append(doc)
    (out / "kubernetes.yaml").write_text(yaml.safe_dump_all(builtin, sort_keys=False))
    summary = ", ".join(f"{kind} x{n}" for kind, n in sorted(counts.items()))
    print(f"{len(docs)} objects: {summary}")


# ---------------------------------------------------------------- CRD schema


def strict_schema(node: object) -> object:
    """OpenAPI v3 (Kubernetes structural schema) -> JSON schema draft-07.

    - nullable: true      -> the type also allows null
    - exclusiveMinimum: true (OpenAPI 3.0 boolean) -> draft-07 numeric form
    - objects with properties and no preserve-unknown-fields reject unknown
      fields, as `kubectl apply` (server-side field validation: Strict) does
    - x-kubernetes-int-or-string -> integer or string
    CEL rules (x-kubernetes-validations) are not evaluated here.
    """
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_schema(value) for key, value in node.items()}
    for bound in ("Minimum", "Maximum"):
        exclusive = f"exclusive{bound}"
        if out.get(exclusive) is True:
            out[exclusive] = out.pop(bound.lower())
        elif out.get(exclusive) is False:
            del out[exclusive]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if (
        "properties" in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


def cmd_crd_schema(crd_path: str, out_path: str) -> None:
    crd = yaml.safe_load(Path(crd_path).read_text())
    if crd.get("kind") != "CustomResourceDefinition":
        raise CheckError(f"{crd_path} is not a CustomResourceDefinition")
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"]
    versions = crd["spec"]["versions"]
    served = [v for v in versions if v.get("served")]
    if not served:
        raise CheckError(f"{crd_path}: no served version")
    one_of = []
    for version in served:
        schema = version.get("schema", {}).get("openAPIV3Schema")
        if not schema:
            raise CheckError(f"{crd_path}: version {version['name']} has no openAPIV3Schema")
        strict = strict_schema(copy.deepcopy(schema))
        strict.setdefault("properties", {})
        strict["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
        strict["properties"]["kind"] = {"const": kind}
        # ObjectMeta is the API server's business; check the essentials only.
        strict["properties"]["metadata"] = {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
                         "maxLength": 253},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        }
        strict["required"] = sorted({*strict.get("required", []), "apiVersion", "kind", "metadata"})
        one_of.append(strict)
    result = {"$schema": "http://json-schema.org/draft-07/schema#", "title": f"{kind} ({group})"}
    if len(one_of) == 1:
        result.update(one_of[0])
    else:
        result["oneOf"] = one_of
    Path(out_path).write_text(json.dumps(result, indent=1))
    print(f"{kind}: strict JSON schema for {', '.join(v['name'] for v in served)} -> {out_path}")


def cmd_crd_sync(chart_crd: str, repo_crd: str) -> None:
    repo = Path(repo_crd)
    if not repo.exists():
        print(f"{repo_crd} not generated yet; the chart's placeholder CRD is used as is")
        return
    if repo.read_bytes() != Path(chart_crd).read_bytes():
        raise CheckError(
            f"{chart_crd} differs from {repo_crd}: regenerate both with "
            "`cargo run -p pingmesh-operator -- crd --write crds/`"
        )
    print(f"{chart_crd} is identical to {repo_crd}")


# ---------------------------------------------------------------- PromQL

# Concrete stand-ins for Grafana's variables, so expressions parse as PromQL.
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "__range_s": "3600",
    "src_tor": "tor-a",
    "dst_tor": "tor-b",
    "node": "node-1",
}
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute_variables(expr: str, where: str) -> str:
    def replace(match: re.Match) -> str:
        name = next(group for group in match.groups() if group)
        if name not in GRAFANA_VARIABLES:
            raise CheckError(f"{where}: unknown Grafana variable ${name} in: {expr}")
        return GRAFANA_VARIABLES[name]

    return VARIABLE.sub(replace, expr)


def dashboard_expressions(path: Path) -> list[tuple[str, str]]:
    dashboard = json.loads(path.read_text())
    found = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    where = f"{path.name}: panel {panel.get('title')!r} target {target.get('refId')}"
                    found.append((where, substitute_variables(target["expr"], where)))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query" and isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and isinstance(query, str):
            # label_values(EXPR, label) is Grafana's, not PromQL: check EXPR.
            match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.S)
            expr = match.group(1) if match else query
            where = f"{path.name}: variable {variable['name']}"
            found.append((where, substitute_variables(expr, where)))
    return found


def rule_expressions(path: Path) -> list[tuple[str, str]]:
    found = []
    for doc in load_documents(path):
        if doc["kind"] != "PrometheusRule":
            continue
        for group in doc.get("spec", {}).get("groups", []):
            for rule in group.get("rules", []):
                name = rule.get("alert") or rule.get("record")
                found.append((f"{path.name}: {group['name']}/{name}", rule["expr"]))
    return found


def documented_metrics() -> set[str]:
    """Metric names the docs promise, plus the reconciler's and Prometheus' own."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    names = set(re.findall(r"`(pingmesh_[a-z0-9_]+)`", text))
    names |= {"pingmesh_reconcile_total", "pingmesh_reconcile_duration_seconds", "pingmesh_reconcile_errors_total"}
    return names


def check_metric_names(expressions: list[tuple[str, str]]) -> None:
    known = documented_metrics()
    unknown = []
    for where, expr in expressions:
        for name in re.findall(r"\b(pingmesh_[a-z0-9_]+)", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if name not in known and base not in known:
                unknown.append(f"{where}: {name}")
        for name in re.findall(r"(?<![\w.])([a-z_][a-z0-9_]*)\s*\{", expr):
            if not name.startswith("pingmesh_") and name != "up":
                unknown.append(f"{where}: {name}")
    if unknown:
        raise CheckError("metrics not documented in docs/metrics.md:\n  " + "\n  ".join(unknown))


def cmd_promql_rules(out_path: str, *files: str) -> None:
    expressions = []
    for name in files:
        path = Path(name)
        expressions += dashboard_expressions(path) if path.suffix == ".json" else rule_expressions(path)
    if not expressions:
        raise CheckError("no PromQL expressions found")
    check_metric_names(expressions)
    rules = [
        {"record": f"pingmesh:check_{index}", "expr": expr, "labels": {"source": where[:200]}}
        for index, (where, expr) in enumerate(expressions)
    ]
    Path(out_path).write_text(yaml.safe_dump({"groups": [{"name": "expressions", "rules": rules}]}, sort_keys=False))
    print(f"{len(expressions)} PromQL expressions from {len(files)} files -> {out_path}")


def cmd_prometheusrule_groups(out_path: str, *files: str) -> None:
    groups = []
    for name in files:
        for doc in load_documents(Path(name)):
            if doc["kind"] == "PrometheusRule":
                groups += doc["spec"]["groups"]
    if not groups:
        raise CheckError("no PrometheusRule groups found")
    Path(out_path).write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    count = sum(len(g["rules"]) for g in groups)
    print(f"{len(groups)} group(s), {count} rule(s) -> {out_path}")


# ---------------------------------------------------------------- Tiltfile


class TiltModel:
    """What the stub built-ins learn from a Tiltfile, checked at the end."""

    def __init__(self, tiltfile: Path, helm: str) -> None:
        self.dir = tiltfile.parent
        self.helm = helm
        self.objects: list[dict] = []
        self.images: dict[str, str] = {}
        self.kinds: dict[str, str] = {}
        self.resources: dict[str, dict] = {}
        self.local_resources: set[str] = set()
        self.errors: list[str] = []

    def path(self, value: str, what: str) -> Path:
        path = (self.dir / value).resolve()
        if not path.exists():
            self.errors.append(f"{what}: {value} does not exist")
        return path

    def workload_names(self) -> dict[str, dict]:
        """Tilt's default resource names: workloads and images-bearing custom kinds."""
        names = {}
        for obj in self.objects:
            kind = obj["kind"]
            if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod") or kind in self.kinds:
                names[obj["metadata"]["name"]] = obj
        return names

    def object_ids(self) -> set[str]:
        ids = set()
        for obj in self.objects:
            name, kind = obj["metadata"]["name"], obj["kind"].lower()
            ids.add(f"{name}:{kind}")
            if obj["metadata"].get("namespace"):
                ids.add(f"{name}:{kind}:{obj['metadata']['namespace']}")
        return ids

    def finish(self) -> list[str]:
        workloads = self.workload_names()
        renamed = {}
        for workload, spec in self.resources.items():
            if spec.get("objects_only"):
                continue
            if workload not in workloads:
                self.errors.append(f"k8s_resource({workload!r}): no workload of that name in k8s_yaml objects")
            if spec.get("new_name"):
                renamed[workload] = spec["new_name"]
        # Resource names after renames: workloads, local_resource()s and
        # object-only k8s_resource(new_name=...) groups.
        known = {renamed.get(name, name) for name in set(workloads) | self.local_resources}
        ids = self.object_ids()
        for workload, spec in self.resources.items():
            for obj in spec.get("objects", []):
                if obj.lower() not in ids:
                    self.errors.append(f"k8s_resource({workload!r}): object {obj!r} is not deployed")
            for dep in spec.get("resource_deps", []):
                if dep not in known:
                    self.errors.append(f"k8s_resource({workload!r}): resource_deps {dep!r} is not a resource")
        rendered = yaml.safe_dump_all(self.objects)
        for image in self.images:
            if image not in rendered:
                self.errors.append(f"docker_build({image!r}): no deployed object uses the image")
        return self.errors


def cmd_tiltfile(tiltfile: str, helm: str, *settings: str) -> None:
    import starlark as sl  # noqa: PLC0415 (only this subcommand needs it)

    path = Path(tiltfile).resolve()
    model = TiltModel(path, helm)
    # `tilt up -- --flag` settings as NAME=true|false|text.
    config_values: dict[str, object] = {}
    for setting in settings:
        name, _, value = setting.partition("=")
        config_values[name] = {"true": True, "false": False}.get(value, value)

    # Values cross into Starlark as JSON, so Tilt's Blob (YAML returned by
    # helm() and blob()) travels as a one-key dict that k8s_yaml() recognises.
    def Blob(text: str) -> dict:  # noqa: N802 (Tilt's name)
        return {BLOB_KEY: text}

    def as_list(value) -> list:
        if value is None:
            return []
        return list(value) if isinstance(value, (list, tuple)) else [value]

    # Stubs with Tilt's parameter names; an unknown keyword fails the call.
    def allow_k8s_contexts(contexts):
        return None

    def update_settings(max_parallel_updates=3, k8s_upsert_timeout_secs=30, suppress_unused_image_warnings=None):
        return None

    def docker_build(ref, context, build_args=None, dockerfile="Dockerfile", dockerfile_contents="",
                     live_update=None, match_in_env_vars=False, ignore=None, only=None, entrypoint=None,
                     target="", ssh="", network="", secret="", extra_tag="", container_args=None,
                     cache_from=None, pull=False, platform="", extra_hosts=None):
        model.path(context, f"docker_build({ref}) context")
        dockerfile_path = model.path(dockerfile, f"docker_build({ref}) dockerfile")
        if target and dockerfile_path.exists():
            stages = re.findall(r"(?im)^FROM\s+\S+(?:\s+AS\s+(\S+))?", dockerfile_path.read_text())
            if target not in stages:
                model.errors.append(f"docker_build({ref}): {dockerfile} has no stage {target!r}")
        for entry in as_list(only):
            # target/tilt/ holds binaries built while Tilt runs (--local-build).
            if not entry.startswith("target/tilt"):
                model.path(entry, f"docker_build({ref}) only")
        model.images[ref] = dockerfile

    def k8s_yaml(yaml_value, allow_duplicates=False):
        for item in as_list(yaml_value):
            text = item[BLOB_KEY] if isinstance(item, dict) else model.path(item, "k8s_yaml").read_text()
            model.objects += [doc for doc in yaml.safe_load_all(text) if doc]

    def blob(contents):
        return Blob(contents)

    def helm(pathToChartDir, name="", namespace="", values=None, set=None, kube_version="", skip_crds=False):  # noqa: A002 (Tilt's name)
        chart = model.path(pathToChartDir, "helm() chart")
        # Modern helm defaults to a recent Kubernetes; this old one to 1.20.
        cmd = [model.helm, "template", name or "chart", str(chart), "--kube-version", kube_version or "1.31.0"]
        if namespace:
            cmd += ["--namespace", namespace]
        for file in as_list(values):
            cmd += ["--values", str(model.path(file, "helm() values"))]
        for item in as_list(set):
            cmd += ["--set", item]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode:
            model.errors.append(f"helm(): {' '.join(cmd)} failed: {result.stderr.strip()}")
            return Blob("")
        return Blob(result.stdout)

    def k8s_kind(kind, api_version=None, image_json_path=None, image_object=None, pod_readiness=""):
        model.kinds[kind] = image_json_path or ""

    def k8s_resource(workload="", new_name="", port_forwards=None, extra_pod_selectors=None,
                     trigger_mode=None, resource_deps=None, objects=None, auto_init=True,
                     pod_readiness="", links=None, labels=None, discovery_strategy=""):
        key = workload or new_name
        model.resources[key] = {
            "new_name": new_name if workload else "",
            "objects_only": not workload,
            "objects": as_list(objects),
            "resource_deps": as_list(resource_deps),
        }
        if not workload:
            model.local_resources.add(new_name)

    def local_resource(name, cmd="", deps=None, trigger_mode=None, resource_deps=None, ignore=None,
                       auto_init=True, serve_cmd="", cmd_bat="", serve_cmd_bat="", allow_parallel=False,
                       links=None, tags=None, env=None, serve_env=None, readiness_probe=None, dir="",  # noqa: A002
                       serve_dir="", labels=None):
        model.local_resources.add(name)

    def local(command, quiet=False, command_bat="", echo_off=False, env=None, dir="", stdin=None):  # noqa: A002
        # Commands are not run; answer like `uname -m` on this machine.
        return "x86_64\n"

    def port_forward(local_port, container_port=None, name=None, link_path=None, host=None):
        return {"local_port": local_port, "container_port": container_port}

    def link(url, name=""):
        return {"url": url}

    def sync(local_path, remote_path):
        return {"sync": local_path}

    def run(cmd, trigger=None, echo_off=False):
        return {"run": cmd}

    def watch_file(file_path):
        model.path(file_path, "watch_file")

    def read_file(file_path, default=None):
        path = model.dir / file_path
        return path.read_text() if path.exists() else default

    def fail(msg):
        raise CheckError(f"Tiltfile called fail(): {msg}")

    def warn(msg):
        return None

    def k8s_namespace():
        return "default"

    def k8s_context():
        return "kind-pingmesh"

    def define(name, args=False, usage=""):
        return None

    def config_parse():
        return config_values

    def os_getenv(key, default=None):
        return default

    def os_name():
        return "posix"

    module = sl.Module()
    for fn in (allow_k8s_contexts, update_settings, docker_build, k8s_yaml, blob, helm, k8s_kind, k8s_resource,
               local_resource, local, port_forward, link, sync, run, watch_file, read_file, fail, warn,
               k8s_namespace, k8s_context):
        module.add_callable(fn.__name__, fn)
    for name, fn in (("_define", define), ("_config_parse", config_parse), ("_os_getenv", os_getenv),
                     ("_os_name", os_name)):
        module.add_callable(name, fn)
    module["TRIGGER_MODE_AUTO"] = 1
    module["TRIGGER_MODE_MANUAL"] = 2

    dialect = sl.Dialect.extended()
    dialect.enable_top_level_stmt = True
    dialect.enable_f_strings = False
    globals_ = sl.Globals.extended_by(
        [sl.LibraryExtension.StructType, sl.LibraryExtension.Print, sl.LibraryExtension.Json]
    )
    prelude = (
        "config = struct(define_bool=_define, define_string=_define, define_string_list=_define, "
        "define_object=_define, parse=_config_parse)\n"
        "os = struct(getenv=_os_getenv, name=_os_name())\n"
    )
    sl.eval(module, sl.parse("prelude", prelude, dialect), globals_)
    try:
        ast = sl.parse(str(path), path.read_text(), dialect)
        sl.eval(module, ast, globals_)
    except sl.StarlarkError as error:
        raise CheckError(f"Tiltfile: {error}") from None
    errors = model.finish()
    if errors:
        raise CheckError("Tiltfile:\n  " + "\n  ".join(errors))
    shown = " ".join(settings) or "no settings"
    print(
        f"Tiltfile ({shown}): evaluated with stub built-ins; {len(model.images)} images, {len(model.objects)} objects, "
        f"{len(model.resources)} k8s_resource calls, {len(model.local_resources)} other resources"
    )


# ---------------------------------------------------------------- Dockerfiles


def dockerignore_patterns(context: Path) -> list[tuple[bool, list[str]]]:
    patterns = []
    ignore = context / ".dockerignore"
    if ignore.exists():
        for line in ignore.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = line[1:] if negated else line
            patterns.append((negated, [part for part in pattern.strip("/").split("/") if part]))
    return patterns


def segments_match(pattern: list[str], path: list[str]) -> bool:
    """Docker's matching: `*` stays inside one path segment, `**` spans any."""
    import fnmatch  # noqa: PLC0415

    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(segments_match(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], pattern[0]) and segments_match(pattern[1:], path[1:])


def ignored_by_docker(patterns: list[tuple[bool, list[str]]], relative: str) -> bool:
    parts = [part for part in relative.strip("/").split("/") if part]
    excluded = False
    for negated, pattern in patterns:
        # A pattern excludes the path itself or any directory above it.
        if any(segments_match(pattern, parts[:end]) for end in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def cmd_dockerfiles(context: str, *dockerfiles: str) -> None:
    import tomllib  # noqa: PLC0415

    root = Path(context).resolve()
    patterns = dockerignore_patterns(root)
    errors = []
    members = tomllib.loads((root / "Cargo.toml").read_text())["workspace"]["members"]
    for needed in ["Cargo.toml", "Cargo.lock", *members, *(f"{m}/Cargo.toml" for m in members)]:
        if not (root / needed).exists():
            errors.append(f"{needed}: missing from the build context")
        elif ignored_by_docker(patterns, needed):
            errors.append(f".dockerignore excludes {needed}, which cargo needs")
    for name in dockerfiles:
        path = Path(name)
        stages: list[str] = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            instruction = words[0].upper()
            if instruction == "FROM":
                if len(words) >= 4 and words[-2].upper() == "AS":
                    if words[-1] in stages:
                        errors.append(f"{path.name}:{number}: stage {words[-1]} defined twice")
                    stages.append(words[-1])
            if instruction == "COPY":
                flags = [w for w in words[1:] if w.startswith("--")]
                paths = [w for w in words[1:] if not w.startswith("--")]
                source_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
                if source_stage is not None:
                    if source_stage not in stages:
                        errors.append(f"{path.name}:{number}: COPY --from={source_stage}: no earlier stage of that name")
                    continue
                for source in paths[:-1]:
                    if "$" in source or source == ".":
                        continue
                    if not (root / source).exists():
                        errors.append(f"{path.name}:{number}: COPY {source}: not in the build context")
                    elif ignored_by_docker(patterns, source):
                        errors.append(f"{path.name}:{number}: COPY {source}: excluded by .dockerignore")
        if "runtime" not in stages or stages[-1] != "runtime":
            errors.append(f"{path.name}: the last (default) stage must be `runtime`")
    if errors:
        raise CheckError("\n  ".join(["Dockerfiles:", *errors]))
    print(f"{len(dockerfiles)} Dockerfiles: stages, COPY sources and the workspace's {len(members)} members in the context")


COMMANDS = {
    "split": (cmd_split, 2),
    "crd-schema": (cmd_crd_schema, 2),
    "crd-sync": (cmd_crd_sync, 2),
    "promql-rules": (cmd_promql_rules, None),
    "prometheusrule-groups": (cmd_prometheusrule_groups, None),
    "tiltfile": (cmd_tiltfile, None),
    "dockerfiles": (cmd_dockerfiles, None),
}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    fn, arity = COMMANDS[argv[1]]
    args = argv[2:]
    if (arity is not None and len(args) != arity) or (arity is None and len(args) < 2):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        fn(*args)
    except CheckError as error:
        print(f"FAIL: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
