"""The `phalanx` command: CRDs, offline validation, rendering, the operator and the dev cluster."""

from __future__ import annotations

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

REPO_CRDS = Path(__file__).resolve().parents[2] / "crds"


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
    target = output or REPO_CRDS
    target.mkdir(parents=True, exist_ok=True)
    for name, crd in generated.items():
        (target / name).write_text(to_yaml(crd), encoding="utf-8")
        typer.echo(f"wrote {target / name}")


@app.command()
def validate(
    files: Annotated[
        list[Path], typer.Argument(help="Manifest files (multi-document YAML allowed).")
    ],
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
            errors = validate_object(obj)
            if not errors:
                typer.echo(f"{where}: {kind}/{name} valid")
                continue
            failed += 1
            for error in errors:
                typer.echo(f"{where}: {kind}/{name}: {error}", err=True)
    if failed:
        raise typer.Exit(1)


def _mount_optional_commands() -> None:
    """Sub-commands whose modules pull in heavier dependencies are added when importable."""
    try:
        from phalanx.devcluster.cli import app as dev_app
    except ImportError:
        return
    app.add_typer(dev_app, name="dev", help="Run a local control plane with fake GPU nodes.")


_mount_optional_commands()


def main() -> None:
    app(prog_name="phalanx")


if __name__ == "__main__":
    main()
