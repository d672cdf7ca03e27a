"""The `phalanx` command: CRDs, offline validation, rendering, the operator and the dev cluster."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
import yaml

import phalanx
from phalanx.api.crd import all_crds, to_yaml
from phalanx.api.validate import load_documents, validate_object

app = typer.Typer(
    help="Phalanx: gang-scheduled, topology-aware LLM training and inference on Kubernetes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def source_crds_dir(root: Path = REPO_ROOT) -> Path | None:
    """`crds/` of the source checkout this module runs from; None when installed as a package
    (the folder above the package is then the interpreter's lib folder, never a target)."""
    if (root / "pyproject.toml").is_file() and (root / "operator" / "phalanx").is_dir():
        return root / "crds"
    return None


@app.command()
def version() -> None:
    """Print the Phalanx version."""
    typer.echo(f"phalanx {phalanx.__version__}")


@app.command()
def crds(
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Directory to write the CRD files into."),
    ] = None,
    stdout: Annotated[
        bool, typer.Option("--stdout", help="Print all CRDs as one YAML stream.")
    ] = False,
) -> None:
    """Generate the CustomResourceDefinitions from the API models."""
    generated = all_crds()
    if stdout:
        typer.echo("---\n".join(to_yaml(crd) for crd in generated.values()), nl=False)
        return
    target = output or source_crds_dir()
    if target is None:
        # Installed from a wheel: the only default would be the interpreter's lib folder.
        typer.echo("--output: give a directory to write the CRDs into, or use --stdout", err=True)
        raise typer.Exit(2)
    target.mkdir(parents=True, exist_ok=True)
    for name, crd in generated.items():
        (target / name).write_text(to_yaml(crd), encoding="utf-8")
        typer.echo(f"wrote {target / name}")


class PodSecurity(enum.StrEnum):
    restricted = "restricted"
    baseline = "baseline"
    privileged = "privileged"


POD_SECURITY_HELP = (
    "The pod security level of the target namespace (its phalanx.dev/pod-security label): "
    "pod-template fields beyond it are refused as the operator would refuse them."
)


@app.command()
def validate(
    files: Annotated[
        list[Path], typer.Argument(help="Manifest files (multi-document YAML allowed).")
    ],
    pod_security: Annotated[
        PodSecurity, typer.Option("--pod-security", help=POD_SECURITY_HELP)
    ] = PodSecurity.restricted,
) -> None:
    """Validate LLMTrainJob and InferenceService manifests offline, printing each error with its field path."""
    failed = 0
    for path in files:
        try:
            documents = list(load_documents(path))
        except (OSError, yaml.YAMLError) as exc:
            typer.echo(f"{path}: cannot read: {str(exc).splitlines()[0]}", err=True)
            failed += 1
            continue
        for index, obj in documents:
            where = f"{path}" + (f"[{index}]" if len(documents) > 1 else "")
            name = obj.get("metadata", {}).get("name", "?") if isinstance(obj, dict) else "?"
            kind = obj.get("kind", "?") if isinstance(obj, dict) else "?"
            errors = validate_object(obj, pod_security.value)
            if not errors:
                typer.echo(f"{where}: {kind}/{name} valid")
                continue
            failed += 1
            for error in errors:
                typer.echo(f"{where}: {kind}/{name}: {error}", err=True)
    if failed:
        raise typer.Exit(1)


@app.command()
def render(
    file: Annotated[Path, typer.Argument(help="An LLMTrainJob manifest.")],
    generation: Annotated[int, typer.Option(help="Gang generation to render.")] = 1,
    pod_security: Annotated[
        PodSecurity, typer.Option("--pod-security", help=POD_SECURITY_HELP)
    ] = PodSecurity.restricted,
) -> None:
    """Print the objects an LLMTrainJob would create (pods, Service, claim, ...), as YAML."""
    from phalanx.render.trainjob import render_job_objects

    try:
        documents = [obj for _, obj in load_documents(file)]
    except (OSError, yaml.YAMLError) as exc:
        typer.echo(f"{file}: cannot read: {str(exc).splitlines()[0]}", err=True)
        raise typer.Exit(1) from None
    rendered: list[dict[str, object]] = []
    for obj in documents:
        errors = validate_object(obj, pod_security.value)
        if errors:
            for error in errors:
                typer.echo(f"{file}: {error}", err=True)
            raise typer.Exit(1)
        if obj.get("kind") != "LLMTrainJob":
            typer.echo(f"{file}: render supports LLMTrainJob manifests only", err=True)
            raise typer.Exit(1)
        rendered += render_job_objects(obj, generation, pod_security.value)
    typer.echo(yaml.safe_dump_all(rendered, sort_keys=False, width=100), nl=False)


class LogLevel(enum.StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"


def kopf_log_flags(level: LogLevel) -> list[str]:
    """kopf sets the root logger's level from its flags (INFO without any)."""
    return {LogLevel.debug: ["--verbose"], LogLevel.info: [], LogLevel.warning: ["--quiet"]}[level]


operator_app = typer.Typer(help="Run the Phalanx operator.", no_args_is_help=True)
app.add_typer(operator_app, name="operator")


@operator_app.command("run")
def operator_run(
    namespace: Annotated[
        list[str] | None, typer.Option("--namespace", "-n", help="Watch only these namespaces.")
    ] = None,
    topology: Annotated[
        str,
        typer.Option(
            envvar="PHALANX_TOPOLOGY",
            help="Topology preset (generic, nvidia, gke, eks) or levels like zone=<label>,rack=<label>,host=kubernetes.io/hostname.",
        ),
    ] = "generic",
    metrics_port: Annotated[
        int, typer.Option(envvar="PHALANX_METRICS_PORT", help="Port of /metrics (0 disables).")
    ] = 8080,
    liveness: Annotated[
        str, typer.Option(help="kopf liveness endpoint URL.")
    ] = "http://0.0.0.0:8081/healthz",
    log_level: Annotated[
        LogLevel, typer.Option(envvar="PHALANX_LOG_LEVEL", help="Log level.")
    ] = LogLevel.info,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging (--log-level debug).")
    ] = False,
) -> None:
    """Run the operator (wraps `kopf run --standalone -m phalanx.handlers`)."""
    import json
    import os

    from kopf.cli import main as kopf_main

    from phalanx.placement import Topology

    try:
        Topology.parse(topology)
    except ValueError as exc:
        typer.echo(f"--topology: {exc}", err=True)
        raise typer.Exit(2) from None
    os.environ["PHALANX_TOPOLOGY"] = topology
    os.environ["PHALANX_METRICS_PORT"] = str(metrics_port)
    # kopf watches only these; the cache's cluster-wide first lists are cut to them too.
    os.environ["PHALANX_WATCH_NAMESPACES"] = json.dumps(namespace or [])
    args = ["run", "--standalone", "-m", "phalanx.handlers", "--liveness", liveness]
    args += [f"--namespace={n}" for n in namespace] if namespace else ["--all-namespaces"]
    args += kopf_log_flags(LogLevel.debug if verbose else log_level)
    kopf_main(args=args, prog_name="phalanx operator run")


from phalanx.devcluster.cli import app as dev_app  # noqa: E402

app.add_typer(dev_app, name="dev", help="Run a local control plane with fake GPU nodes.")


def main() -> None:
    app(prog_name="phalanx")


if __name__ == "__main__":
    main()
