"""`phalanx dev`: build, start, inspect and stop the local control plane."""

from __future__ import annotations

import functools
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from phalanx.devcluster import build as build_
from phalanx.devcluster import paths
from phalanx.devcluster.cluster import ClusterStatus, DevCluster
from phalanx.devcluster.errors import DevClusterError
from phalanx.devcluster.processes import ProcessState
from phalanx.devcluster.profiles import PROFILES

app = typer.Typer(
    help="Local Kubernetes control plane (etcd, kube-apiserver, controller-manager, "
    "scheduler, kwok fake GPU nodes) for tests and demos.",
    no_args_is_help=True,
)

T = TypeVar("T")
DirOption = Annotated[
    Path | None,
    typer.Option("--dir", help="State directory (default: ~/.cache/phalanx/dev/<name>)."),
]
NameOption = Annotated[
    str, typer.Option("--name", help="Cluster name, used for the default --dir.")
]


def _run(action: Callable[[], T]) -> T:
    """Run an action, turning our errors into one line on stderr and exit status 1."""
    try:
        return action()
    except DevClusterError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


def _cluster(directory: Path | None, name: str) -> DevCluster:
    return DevCluster(directory if directory is not None else paths.default_state_dir(name))


def _export_line(kubeconfig: Path) -> str:
    return f"export KUBECONFIG={shlex.quote(str(kubeconfig))}"


@app.command()
def build(
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if cached.")] = False,
    tools: Annotated[
        bool,
        typer.Option(
            "--tools", help="Also helm (the chart's tests) and Prometheus (`dev prometheus`)."
        ),
    ] = False,
    with_: Annotated[
        list[str] | None,
        typer.Option(
            "--with", help="Also these peers: kueue (the scale benchmark's Kueue TAS mode)."
        ),
    ] = None,
) -> None:
    """Build the pinned binaries from the Go module proxy into ~/.cache/phalanx/bin/<version>/."""
    peers = {"kueue": build_.ensure_kueue}
    unknown = sorted(set(with_ or ()) - set(peers))
    if unknown:
        raise typer.BadParameter(
            f"unknown peer {', '.join(unknown)}; known: kueue", param_hint="--with"
        )
    started = time.monotonic()
    target = _run(lambda: build_.ensure_binaries(force=force, progress=typer.echo))
    typer.echo(f"binaries ready in {target} ({time.monotonic() - started:.1f}s)")
    extra = [build_.ensure_helm, build_.ensure_prometheus] if tools else []
    for ensure in extra + [peers[name] for name in with_ or ()]:
        tool = _run(functools.partial(ensure, force=force, progress=typer.echo))
        typer.echo(f"{tool.name} ready in {tool.parent} ({time.monotonic() - started:.1f}s)")


@app.command()
def images(
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Build only these images: operator, trainer, inference."),
    ] = None,
) -> None:
    """Build the operator, trainer and inference images from images/*/Dockerfile (buildah)."""
    from phalanx.devcluster.images import IMAGES, ImageBuilder

    known = {image.name for image in IMAGES}
    unknown = sorted(set(only or ()) - known)
    if unknown:
        typer.echo(
            f"error: --only {', '.join(unknown)}: choose from {', '.join(sorted(known))}", err=True
        )
        raise typer.Exit(2)
    started = time.monotonic()
    built = _run(lambda: ImageBuilder(progress=typer.echo).build_all(only or None))
    for tag, stamp in built.items():
        typer.echo(f"{tag:48} {stamp}")
    typer.echo(f"images ready ({time.monotonic() - started:.1f}s)")


@app.command()
def up(
    profile: Annotated[
        str, typer.Option("--profile", help=f"Node profile: {', '.join(PROFILES)}.")
    ] = "gpu",
    nodes: Annotated[
        int | None,
        typer.Option("--nodes", min=0, help="Number of fake nodes (default: the profile's)."),
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="kube-apiserver port (default: a free one).")
    ] = None,
    real: Annotated[
        int,
        typer.Option(
            "--real",
            min=0,
            max=8,
            help="Real kubelet nodes (containerd, runc, CNI) to add; they run the images "
            "`phalanx dev images` built.",
        ),
    ] = 0,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for readiness.")
    ] = 180.0,
    directory: DirOption = None,
    name: NameOption = "default",
) -> None:
    """Start the control plane and fake nodes, then print the KUBECONFIG export line."""
    cluster = _cluster(directory, name)
    kubeconfig = _run(
        lambda: cluster.up(
            profile=profile,
            nodes=nodes,
            port=port,
            real=real,
            timeout=timeout,
            progress=typer.echo,
        )
    )
    typer.echo(_export_line(kubeconfig))


@app.command(
    name="exec",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def exec_(
    ctx: typer.Context,
    directory: DirOption = None,
    name: NameOption = "default",
) -> None:
    """Run a command inside the cluster's network namespace (where pod IPs are reachable),
    with KUBECONFIG set: `phalanx dev exec -- phalanx operator run`."""
    import os

    from phalanx.devcluster import netns

    cluster = _cluster(directory, name)
    if not ctx.args:
        typer.echo("error: give a command: phalanx dev exec -- COMMAND [ARGS...]", err=True)
        raise typer.Exit(2)
    namespace = cluster.namespace()
    if namespace is not None:
        netns.setns(netns.namespace_path(namespace))
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    try:
        os.execvp(ctx.args[0], ctx.args)
    except OSError as error:
        typer.echo(f"error: {ctx.args[0]}: {error.strerror}", err=True)
        raise typer.Exit(127) from None


@app.command()
def demo(directory: DirOption = None, name: NameOption = "default") -> None:
    """Build what is missing, start 2 real nodes and the operator, train jobs/tiny-cpu.yaml,
    serve its export and print a completion from it."""
    from phalanx.devcluster.demo import run_demo

    _run(lambda: run_demo(typer.echo, directory or paths.default_state_dir(name)))


@app.command()
def prometheus(
    directory: DirOption = None,
    name: NameOption = "default",
    interval: Annotated[float, typer.Option(help="Scrape interval in seconds.")] = 2.0,
) -> None:
    """Run Prometheus beside the cluster with the chart's workload scrape configs (trainer
    and server pods) and the operator as targets; print its URL. `dev down` stops it."""
    url = _run(lambda: _cluster(directory, name).start_prometheus(interval_seconds=interval))
    typer.echo(url)


@app.command()
def down(directory: DirOption = None, name: NameOption = "default") -> None:
    """Stop the processes `up` started (safe to run twice)."""
    stopped = _run(_cluster(directory, name).down)
    typer.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def status(directory: DirOption = None, name: NameOption = "default") -> None:
    """Show each component (running / crashed / stopped) and the nodes."""
    report = _run(_cluster(directory, name).status)
    typer.echo(format_status(report))
    if not report.running:
        raise typer.Exit(1)


@app.command()
def env(directory: DirOption = None, name: NameOption = "default") -> None:
    """Print the KUBECONFIG export line of a running cluster: eval "$(phalanx dev env)"."""
    cluster = _cluster(directory, name)
    if not cluster.kubeconfig.exists():
        typer.echo(f"error: no dev cluster in {cluster.root}: run `phalanx dev up`", err=True)
        raise typer.Exit(1)
    typer.echo(_export_line(cluster.kubeconfig))


def format_status(report: ClusterStatus) -> str:
    lines = [f"cluster   {report.root}", f"kubeconfig {report.kubeconfig}"]
    for component in report.components:
        if component.state is ProcessState.RUNNING:
            detail = f"pid {component.pid}, {component.rss_bytes / 2**20:.0f} MiB"
        elif component.state is ProcessState.CRASHED:
            detail = f"see {component.log}"
        else:
            detail = ""
        lines.append(f"  {component.name:<24} {component.state.value:<8} {detail}".rstrip())
    if report.nodes is not None:
        accelerators = ", ".join(
            f"{count} {resource}" for resource, count in report.nodes.accelerators.items() if count
        )
        lines.append(
            f"nodes     {report.nodes.ready}/{report.nodes.total} Ready"
            + (f", {accelerators}" if accelerators else "")
        )
    return "\n".join(lines)
