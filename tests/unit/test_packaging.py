"""The package as pip installs it: the wheel carries the CRDs, the chart and its dashboards;
`phalanx crds` never writes into the interpreter's lib folder; entry points whose extra is not
installed say which extra in one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("phalanx-*.whl")
    return built


def test_wheel_carries_crds_chart_dashboards_and_license(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        *(f"phalanx/_data/crds/{p.name}" for p in (ROOT / "crds").glob("*.yaml")),
        *(
            f"phalanx/_data/charts/phalanx/{p.relative_to(ROOT / 'charts' / 'phalanx')}"
            for p in (ROOT / "charts" / "phalanx").rglob("*")
            if p.is_file()
        ),
    }
    assert "phalanx/_data/charts/phalanx/dashboards/training.json" in expected
    assert expected <= names, sorted(expected - names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Classifier: License :: OSI Approved :: Apache Software License" in text
    assert "Project-URL: Source, " in text


def test_installed_crds_command_never_writes_into_lib(wheel: Path, tmp_path: Path) -> None:
    # The wheel unpacked as site-packages: the folder two levels above phalanx/cli.py is lib/.
    site = tmp_path / "lib" / "python3" / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    run = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(site)!r})
        from phalanx.cli import main
        sys.argv = ["phalanx", "crds"]
        main()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", run], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        result.stderr.strip()
        == "--output: give a directory to write the CRDs into, or use --stdout"
    )
    assert not (tmp_path / "lib" / "python3" / "crds").exists()
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == ["python3"]
    written = subprocess.run(
        [sys.executable, "-c", run.replace('"crds"]', f'"crds", "-o", {str(tmp_path / "out")!r}]')],
        capture_output=True,
        text=True,
        check=False,
    )
    assert written.returncode == 0, written.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in (ROOT / "crds").glob("*.yaml")
    )


# Modules of the extras, made unimportable as they are in a plain `pip install phalanx`.
BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    EXTRAS = {"torch", "numpy", "tokenizers", "safetensors", "fastapi", "uvicorn", "uvloop",
              "httptools", "jinja2"}
    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.partition(".")[0] in EXTRAS:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, Missing())
    """
)


@pytest.mark.parametrize(
    ("entry", "args", "extra"),
    [
        ("phalanx_serve.cli:main", ["--model", "builtin:tiny", "--port", "0"], "serve"),
        ("phalanx_trainer.cli:main", ["--steps", "1"], "train"),
        ("phalanx_trainer.data_cli:main", ["--help"], "train"),
    ],
    ids=["phalanx-serve", "phalanx-train", "phalanx-data"],
)
def test_entry_point_without_its_extra_names_the_extra(
    entry: str, args: list[str], extra: str
) -> None:
    module, _, function = entry.partition(":")
    # What the console script pip generates does: import the module, call the function.
    script = BLOCKER + f"import sys\nfrom {module} import {function}\nsys.exit({function}())\n"
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"pip install 'phalanx[{extra}]'" in lines[0]
