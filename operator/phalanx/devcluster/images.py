"""Build Phalanx's images from `images/*/Dockerfile` without a daemon, and load them into nodes.

The chain is: a Debian bookworm root file system made by debootstrap (python3 and pip) →
a torch base image built from a local wheelhouse (PyPI's torch is the CUDA build, ~3 GB of
wheels: downloaded once into the wheelhouse and kept) → the operator, trainer and inference
images, built by buildah from the same Dockerfiles users build with Docker, with the base passed
as the `BASE_IMAGE` build argument. Each image is tagged with the name the CRDs default to
(`constants.TRAINER_IMAGE`, ...) so the examples in jobs/ run unchanged, and stamped with a hash
of everything it was built from: an image is rebuilt only when that hash changes.

Every buildah call runs in a private mount namespace with its run root on a private tmpfs,
so no overlay mount is ever left in the machine's mount table.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phalanx.constants import SERVER_IMAGE, TRAINER_IMAGE
from phalanx.devcluster import paths
from phalanx.devcluster.errors import DevClusterError

Progress = Callable[[str], None]

DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-pip", "python-is-python3", "ca-certificates", "procps")
DEBIAN_IMAGE = "localhost/phalanx-debian:bookworm"
TORCH_BASE_IMAGE = "localhost/phalanx-torch-base:dev"
PAUSE_IMAGE = "localhost/phalanx-pause:dev"
OPERATOR_IMAGE = "ghcr.io/phalanx-dev/operator:0.1.0"  # the chart's default image and appVersion
# The wheels the torch base holds; the versions are the ones this virtualenv runs.
BASE_WHEELS = ("torch", "numpy", "tokenizers", "safetensors")
# The host's CA bundle and pip settings: a TLS-intercepting proxy in front of PyPI needs both
# inside RUN steps, and they are mounted read-only (never copied into a layer).
HOST_PIP_FILES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf")


@dataclass(frozen=True)
class ImageSpec:
    """One image built from a Dockerfile of the repository."""

    name: str  # short name: operator, trainer, inference
    tag: str  # the reference the CRDs and the chart default to
    dockerfile: str  # relative to the repository root
    sources: tuple[str, ...]  # what its COPY lines read (hashed into the stamp)
    base: str | None  # passed as BASE_IMAGE; None keeps the Dockerfile's own FROM


_PACKAGE_SOURCES = ("pyproject.toml", "README.md", "operator", "images/trainer", "images/inference")
IMAGES = (
    ImageSpec(
        "operator",
        OPERATOR_IMAGE,
        "images/operator/Dockerfile",
        (*_PACKAGE_SOURCES, "crds"),
        DEBIAN_IMAGE,
    ),
    ImageSpec(
        "trainer", TRAINER_IMAGE, "images/trainer/Dockerfile", _PACKAGE_SOURCES, TORCH_BASE_IMAGE
    ),
    ImageSpec(
        "inference", SERVER_IMAGE, "images/inference/Dockerfile", _PACKAGE_SOURCES, TORCH_BASE_IMAGE
    ),
)


def images_dir() -> Path:
    return paths.cache_root() / "images"


def repository_root() -> Path:
    """The checkout the images are built from (the one this package was installed from)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "images").is_dir():
            return parent
    raise DevClusterError(
        "phalanx dev images builds from a source checkout; this installation has none "
        "(install with `pip install -e .` from a clone)"
    )


def tree_hash(root: Path, entries: Iterable[str], *extra: str) -> str:
    """A hash of file names and contents under `entries` (caches and bytecode left out)."""
    digest = hashlib.sha256()
    for text in extra:
        digest.update(text.encode() + b"\0")
    for entry in sorted(entries):
        base = root / entry
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in files:
            relative = path.relative_to(root).as_posix()
            if "__pycache__" in relative or relative.endswith((".pyc", ".pyo")):
                continue
            digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


class Buildah:
    """buildah with its own storage under the cache, each call in a private mount namespace."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self.storage = root / "storage"
        self.runroot = root / "run"
        self.conf = root / "conf"

    def prepare(self) -> None:
        if shutil.which("buildah") is None:
            raise DevClusterError(
                "buildah is not installed: `apt-get install buildah` (Debian's package), then "
                "`phalanx dev images` again"
            )
        for directory in (self.storage, self.runroot, self.conf):
            directory.mkdir(parents=True, exist_ok=True)
        (self.conf / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.storage}"\n'
            f'runroot = "{self.runroot}"\n'
        )
        (self.conf / "registries.conf").write_text(
            'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
        )
        (self.conf / "policy.json").write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]})
        )

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": str(self.conf / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.conf / "registries.conf"),
            "BUILDAH_ISOLATION": "chroot",
        }

    def script(self, commands: str, *, what: str, stdout: int | None = None) -> str:
        """Run a shell script of buildah commands in one private mount namespace."""
        policy = f"--signature-policy={self.conf / 'policy.json'}"
        wrapped = (
            f"set -eu; mount -t tmpfs tmpfs {self.runroot}; SIG={policy}; export SIG; {commands}"
        )
        with open(self.log, "a") as log:
            log.write(f"$ [{what}] {commands}\n")
            log.flush()
            result = subprocess.run(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", wrapped],
                env=self.env,
                stdout=subprocess.PIPE if stdout is None else stdout,
                stderr=log,
                text=True,
                check=False,
            )
        if result.returncode != 0:
            raise DevClusterError(f"{what} failed (exit {result.returncode}); log: {self.log}")
        return result.stdout or ""

    def inspect(self, reference: str) -> dict[str, Any] | None:
        """buildah's description of a stored image, or None when it is not stored."""
        out = self.script(
            f"buildah inspect --type image {reference} 2>/dev/null || echo MISSING",
            what=f"inspect {reference}",
        ).strip()
        if out.endswith("MISSING"):
            return None
        loaded = json.loads(out)
        return loaded if isinstance(loaded, dict) else None

    def image_labels(self, reference: str) -> dict[str, str] | None:
        """The labels of a stored image, or None when it is not stored."""
        found = self.inspect(reference)
        if found is None:
            return None
        labels = (found.get("OCIv1", {}).get("config") or {}).get("Labels")
        return dict(labels) if isinstance(labels, dict) else {}

    def image_id(self, reference: str) -> str:
        found = self.inspect(reference)
        if found is None:
            raise DevClusterError(f"image {reference} is not built: run `phalanx dev images`")
        return str(found["FromImageID"])


STAMP_LABEL = "dev.phalanx.source-hash"


class ImageBuilder:
    """Builds what is missing or stale, in dependency order; reports each step's time."""

    def __init__(self, progress: Progress | None = None) -> None:
        self.report = progress or (lambda _line: None)
        self.root = images_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.buildah = Buildah(self.root / "buildah", self.root / "build.log")
        self.repo = repository_root()

    def build_all(self, names: Sequence[str] | None = None) -> dict[str, str]:
        """Build the pause, base and named images; returns tag -> source hash."""
        self.buildah.prepare()
        built = {PAUSE_IMAGE: self.pause()}
        built[DEBIAN_IMAGE] = self.debian()
        wanted = [image for image in IMAGES if names is None or image.name in names]
        if any(image.base == TORCH_BASE_IMAGE for image in wanted):
            built[TORCH_BASE_IMAGE] = self.torch_base(built[DEBIAN_IMAGE])
        for image in wanted:
            assert image.base is not None
            built[image.tag] = self.dockerfile(image, built[image.base])
        # Rebuilt images leave their predecessors untagged: the disk is shared, drop them.
        self.buildah.script("buildah rmi --prune >/dev/null 2>&1 || true", what="prune images")
        return built

    # -- the steps ------------------------------------------------------------------------

    def pause(self) -> str:
        """The pod sandbox image: one static Go binary that sleeps and reaps."""
        source = Path(__file__).with_name("pause")
        stamp = tree_hash(source, ["main.go"])
        if self._current(PAUSE_IMAGE, stamp):
            return stamp
        started = time.monotonic()
        work = self.root / "pause"
        work.mkdir(exist_ok=True)
        shutil.copy(source / "main.go", work / "main.go")
        (work / "go.mod").write_text("module phalanx.dev/pause\n\ngo 1.26.0\n")
        go = shutil.which("go")
        if go is None:
            raise DevClusterError("the Go toolchain is needed to build the pause image")
        subprocess.run(
            [go, "build", "-trimpath", "-ldflags", "-s -w", "-o", "pause", "."],
            cwd=work,
            env={**os.environ, "CGO_ENABLED": "0"},
            check=True,
            capture_output=True,
        )
        self.buildah.script(
            f"c=$(buildah from $SIG scratch); buildah copy $c {work / 'pause'} /pause; "
            f"buildah config --entrypoint '[\"/pause\"]' --user 65535:65535 "
            f"--label {STAMP_LABEL}={stamp} $c; buildah commit -q $SIG $c {PAUSE_IMAGE}; buildah rm $c",
            what="pause image",
        )
        self.report(f"built {PAUSE_IMAGE} in {time.monotonic() - started:.0f}s")
        return stamp

    def debian(self) -> str:
        """Debian bookworm with python3 and pip, from the machine's own Debian mirror."""
        mirror = debian_mirror()
        stamp = hashlib.sha256(
            f"{DEBIAN_SUITE} {mirror} {' '.join(DEBIAN_PACKAGES)}".encode()
        ).hexdigest()[:16]
        if self._current(DEBIAN_IMAGE, stamp):
            return stamp
        if shutil.which("debootstrap") is None:
            raise DevClusterError("debootstrap is not installed: `apt-get install debootstrap`")
        started = time.monotonic()
        rootfs = self.root / "debian-rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        tarball = self.root / "debian-rootfs.tar"
        # debootstrap mounts /proc inside the target: a private mount namespace keeps that there.
        with open(self.buildah.log, "a") as log:
            result = subprocess.run(
                [
                    "unshare",
                    "-m",
                    "--propagation",
                    "private",
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(DEBIAN_PACKAGES)}",
                    DEBIAN_SUITE,
                    str(rootfs),
                    mirror,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if result.returncode != 0:
            raise DevClusterError(f"debootstrap failed; log: {self.buildah.log}")
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()  # the image is one application's world: pip installs system-wide
        subprocess.run(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."], check=True
        )
        shutil.rmtree(rootfs)
        self.buildah.script(
            f"c=$(buildah from $SIG scratch); buildah add $c {tarball} /; "
            "buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "
            f"--cmd '[\"/bin/bash\"]' --label {STAMP_LABEL}={stamp} $c; "
            f"buildah commit -q $SIG $c {DEBIAN_IMAGE}; buildah rm $c",
            what="debian image",
        )
        tarball.unlink()
        self.report(f"built {DEBIAN_IMAGE} in {time.monotonic() - started:.0f}s")
        return stamp

    def torch_base(self, debian_stamp: str) -> str:
        """Debian + torch and the other heavy wheels, installed offline from the wheelhouse."""
        wheelhouse = self.wheelhouse()
        pins = base_pins()
        dockerfile = self.repo / "images/base/Dockerfile"
        stamp = tree_hash(self.repo, ["images/base/Dockerfile"], debian_stamp, *pins)
        if self._current(TORCH_BASE_IMAGE, stamp):
            return stamp
        started = time.monotonic()
        self.buildah.script(
            f"buildah bud $SIG --pull=never --layers=false -q -f {dockerfile} "
            f"--build-arg DEBIAN_IMAGE={DEBIAN_IMAGE} --build-arg 'WHEELS={' '.join(pins)}' "
            f"--volume {wheelhouse}:/wheels:ro --label {STAMP_LABEL}={stamp} "
            f"-t {TORCH_BASE_IMAGE} {dockerfile.parent}",
            what="torch base image",
        )
        self.report(f"built {TORCH_BASE_IMAGE} in {time.monotonic() - started:.0f}s")
        return stamp

    def wheelhouse(self) -> Path:
        """The base image's wheels, downloaded once (pip's own cache makes it quick)."""
        target = self.root / "wheelhouse"
        pins = base_pins()
        marker = target / "pins.txt"
        if marker.exists() and marker.read_text().split() == list(pins):
            return target
        started = time.monotonic()
        target.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(target), *pins],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise DevClusterError(
                f"pip download of {' '.join(pins)} failed: {result.stderr[-400:]}"
            )
        marker.write_text("\n".join(pins) + "\n")
        self.report(
            f"downloaded the wheelhouse ({_size(target)}) in {time.monotonic() - started:.0f}s"
        )
        return target

    def dockerfile(self, image: ImageSpec, base_stamp: str) -> str:
        stamp = tree_hash(self.repo, (image.dockerfile, *image.sources), base_stamp)
        if self._current(image.tag, stamp):
            return stamp
        started = time.monotonic()
        mounts = " ".join(
            f"--volume {path}:{path}:ro" for path in HOST_PIP_FILES if Path(path).exists()
        )
        self.buildah.script(
            f"cd {self.repo}; buildah bud $SIG --pull=never --layers=false -q -f {image.dockerfile} "
            f"--build-arg BASE_IMAGE={image.base} {mounts} --label {STAMP_LABEL}={stamp} "
            f"-t {image.tag} .",
            what=f"{image.name} image",
        )
        self.report(f"built {image.tag} in {time.monotonic() - started:.0f}s")
        return stamp

    def _current(self, reference: str, stamp: str) -> bool:
        labels = self.buildah.image_labels(reference)
        return labels is not None and labels.get(STAMP_LABEL) == stamp

    # -- loading into a node's containerd -------------------------------------------------

    def load(self, references: Iterable[str], ctr: Path, socket: Path) -> list[str]:
        """Bring each image into one containerd unless it already holds this build.

        Images are exported once into an OCI layout under the cache (uncompressed, so the
        big torch layer is written once and shared by every image on it); a node then receives
        only the blobs its content store lacks, so a rebuilt trainer costs its top layer.
        """
        loaded = []
        present = _containerd_images(ctr, socket)
        for reference in references:
            image_id = self.buildah.image_id(reference)
            if present.get(_normalise(reference)) == image_id:
                continue
            started = time.monotonic()
            manifest = self._export(reference, image_id)
            # The build this one replaces goes, with the runtime's ID reference to it, so
            # containerd collects its layers and snapshots (nodes keep images across clusters).
            _remove_image(ctr, socket, _normalise(reference))
            have = _containerd_blobs(ctr, socket)
            sent = _import_blobs(self.layout, reference, manifest, have, ctr, socket)
            # Record which build this is, so the next load of the same build is skipped.
            subprocess.run(
                [
                    str(ctr),
                    "-a",
                    str(socket),
                    "-n",
                    "k8s.io",
                    "images",
                    "label",
                    _normalise(reference),
                    f"{STAMP_LABEL}={image_id}",
                ],
                check=True,
                capture_output=True,
            )
            loaded.append(
                f"{reference} ({sent / 2**20:.0f} MiB sent, {time.monotonic() - started:.0f}s)"
            )
        return loaded

    @property
    def layout(self) -> Path:
        return self.root / "oci"

    def _export(self, reference: str, image_id: str) -> dict[str, Any]:
        """The image's manifest descriptor in the OCI layout, exporting it when stale."""
        exported_file = self.layout / "exported.json"
        try:
            exported = json.loads(exported_file.read_text())
        except (OSError, ValueError):
            exported = {}
        if exported.get(reference) != image_id:
            self.buildah.script(
                f"buildah push -q -D $SIG {reference} oci:{self.layout}:{reference} >/dev/null",
                what=f"export {reference}",
            )
            exported[reference] = image_id
            exported_file.write_text(json.dumps(exported, indent=2))
            _prune_layout(self.layout)
        for descriptor in _layout_index(self.layout)["manifests"]:
            if descriptor.get("annotations", {}).get(REF_NAME) == reference:
                return dict(descriptor)
        raise DevClusterError(f"{reference} is missing from {self.layout} after export")


REF_NAME = "org.opencontainers.image.ref.name"


def _layout_index(layout: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((layout / "index.json").read_text())
    return loaded


def _blob(layout: Path, digest: str) -> Path:
    algorithm, _, value = digest.partition(":")
    return layout / "blobs" / algorithm / value


def _manifest_blobs(layout: Path, descriptor: dict[str, Any]) -> list[str]:
    manifest = json.loads(_blob(layout, descriptor["digest"]).read_text())
    return [
        descriptor["digest"],
        manifest["config"]["digest"],
        *(layer["digest"] for layer in manifest["layers"]),
    ]


def _prune_layout(layout: Path) -> None:
    """Drop blobs no tagged image uses any more (old top layers of rebuilt images)."""
    index = _layout_index(layout)
    # A re-export of a name moves the name to the new manifest and leaves the old one unnamed.
    index["manifests"] = [d for d in index["manifests"] if d.get("annotations", {}).get(REF_NAME)]
    (layout / "index.json").write_text(json.dumps(index))
    used = {d for descriptor in index["manifests"] for d in _manifest_blobs(layout, descriptor)}
    for path in (layout / "blobs" / "sha256").iterdir():
        if f"sha256:{path.name}" not in used:
            path.unlink()


def _import_blobs(
    layout: Path,
    reference: str,
    descriptor: dict[str, Any],
    have: set[str],
    ctr: Path,
    socket: Path,
) -> int:
    """Stream an OCI archive of one image, holding only the blobs the node lacks, into ctr."""
    import io
    import tarfile

    index = json.dumps({"schemaVersion": 2, "manifests": [descriptor]}).encode()
    process = subprocess.Popen(
        [str(ctr), "-a", str(socket), "-n", "k8s.io", "images", "import", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stdin is not None
    sent = 0
    with tarfile.open(fileobj=process.stdin, mode="w|") as archive:
        for name, data in (
            ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
            ("index.json", index),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for digest in _manifest_blobs(layout, descriptor):
            if digest in have:
                continue
            path = _blob(layout, digest)
            archive.add(path, arcname=str(path.relative_to(layout)))
            sent += path.stat().st_size
    process.stdin.close()
    assert process.stderr is not None
    errors = process.stderr.read().decode(errors="replace")
    if process.wait() != 0:
        raise DevClusterError(f"importing {reference}: {errors[-400:]}")
    return sent


def _containerd_blobs(ctr: Path, socket: Path) -> set[str]:
    result = subprocess.run(
        [str(ctr), "-a", str(socket), "-n", "k8s.io", "content", "ls", "-q"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(result.stdout.split())


@dataclass(frozen=True)
class _StoredImage:
    name: str
    digest: str  # the manifest: every name of one image (the CRI's `sha256:` ID too) shares it
    labels: dict[str, str]


def _stored_images(ctr: Path, socket: Path) -> list[_StoredImage]:
    """`ctr images ls` of the CRI's namespace: name, manifest digest and labels of each."""
    result = subprocess.run(
        [str(ctr), "-a", str(socket), "-n", "k8s.io", "images", "ls"],
        capture_output=True,
        text=True,
        check=True,
    )
    return parse_image_listing(result.stdout)


def parse_image_listing(text: str) -> list[_StoredImage]:
    images = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 3:
            continue
        labels = dict(label.partition("=")[::2] for label in fields[-1].split(",") if "=" in label)
        images.append(_StoredImage(fields[0], fields[2], labels))
    return images


def _containerd_images(ctr: Path, socket: Path) -> dict[str, str]:
    """Image name -> the build stamp it was loaded with."""
    return {
        image.name: image.labels[STAMP_LABEL]
        for image in _stored_images(ctr, socket)
        if STAMP_LABEL in image.labels
    }


def _remove_image(ctr: Path, socket: Path, name: str) -> None:
    """Delete an image and every other name (the CRI's `sha256:` ID) for the same manifest."""
    stored = _stored_images(ctr, socket)
    digest = next((image.digest for image in stored if image.name == name), None)
    if digest is None:
        return
    names = [image.name for image in stored if image.digest == digest]
    subprocess.run(
        [str(ctr), "-a", str(socket), "-n", "k8s.io", "images", "rm", "--sync", *names],
        capture_output=True,
        check=False,
    )


def _normalise(reference: str) -> str:
    """containerd names images fully: `localhost/x:y` stays, `name:tag` gains docker.io/library."""
    first = reference.split("/", 1)[0]
    if "/" in reference and ("." in first or ":" in first or first == "localhost"):
        return reference
    return f"docker.io/{reference if '/' in reference else 'library/' + reference}"


def base_pins() -> tuple[str, ...]:
    """`name==version` of the base wheels, as installed in this environment."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in BASE_WHEELS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError as error:
            raise DevClusterError(
                f"{name} is not installed here; install Phalanx with its [train] extra first"
            ) from error
    return tuple(pins)


def debian_mirror() -> str:
    """The Debian mirror apt on this machine uses (the only one it can reach)."""
    explicit = os.environ.get("PHALANX_DEBIAN_MIRROR")
    if explicit:
        return explicit
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    for line in _read(Path("/etc/apt/sources.list")).splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
            return parts[1]
    return "http://deb.debian.org/debian"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _size(path: Path) -> str:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return f"{total / 2**30:.1f} GiB"
