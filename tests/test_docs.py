"""The documentation site (docs/, mkdocs.yml): it builds in strict mode, its reference pages cover
the command line and the layer rules, and the built pages render in a headless browser."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: pages written beside this one; they must be in the nav
NAV_PAGES = (
    "index.md",
    "getting-started.md",
    "estimators.md",
    "layers.md",
    "cli.md",
    "experiments.md",
    "benchmarks.md",
    "api.md",
    "exactness.md",
    "gpu.md",
    "workflows.md",
    "free_fishers.md",
    "structured.md",
    "architecture.md",
    "math.md",
)


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_mkdocs = pytest.mark.skipif(
    not (_have("mkdocs") and _have("material") and _have("mkdocstrings_handlers.python")),
    reason="mkdocs-material, mkdocstrings and mkdocstrings-python are not installed "
    "(pip install -e '.[docs]')",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once with ``mkdocs build --strict`` (a warning fails the build)."""
    if not (_have("mkdocs") and _have("material") and _have("mkdocstrings_handlers.python")):
        pytest.skip("mkdocs-material, mkdocstrings and mkdocstrings-python are not installed")
    out = tmp_path_factory.mktemp("site")
    env = {"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin", "HOME": str(out)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out


@needs_mkdocs
def test_strict_build_has_every_page(site):
    for page in NAV_PAGES:
        name = "index.html" if page == "index.md" else f"{page[:-3]}/index.html"
        assert (site / name).is_file(), page
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in NAV_PAGES:
        assert page in nav, f"{page} is not in the nav of mkdocs.yml"


@needs_mkdocs
def test_api_reference_documents_every_export(site):
    import fimfast

    html = (site / "api" / "index.html").read_text()
    for name in fimfast.__all__:
        if name == "__version__":
            assert "__version__" in html
            continue
        assert f'id="fimfast.{name}"' in html, name
    # the docstrings themselves, not only the names
    assert "Accumulate" in html or "accumulate" in html
    assert "Raises" in html
    # Sphinx roles of the docstrings are rendered as code, never shown literally
    # (scripts/griffe_sphinx_roles.py)
    for role in (":class:", ":func:", ":meth:", ":mod:", ":attr:"):
        assert role not in html, role


def _cli_options() -> dict[str, list[str]]:
    from fimfast import cli

    parser = cli.build_parser()
    out = {}
    for name, sub in parser.subparsers.items():
        flags = []
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flags += [s for s in action.option_strings if s.startswith("--")]
        out[name] = flags
    return out


def test_cli_reference_lists_every_command_and_option():
    text = (DOCS / "cli.md").read_text()
    options = _cli_options()
    assert set(options) == {"run", "viz", "metrics", "demo", "bench"}
    for command, flags in options.items():
        assert f"## `fimfast {command}`" in text, command
        section = text.split(f"## `fimfast {command}`", 1)[1].split("\n## ", 1)[0]
        for flag in flags:
            assert f"`{flag}" in section, f"fimfast {command} {flag} is not in docs/cli.md"
    from fimfast.experiments import experiment_names

    for name in experiment_names():
        assert f"`{name}`" in text


def test_layers_page_lists_every_rule():
    from fimfast.rules import registry

    builtin = [(c, r) for c, r in registry._TABLE.items() if c.__module__.startswith("torch.nn")]

    text = (DOCS / "layers.md").read_text()
    table = text.split("## Modules with a rule", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and "---" not in r][1:]
    for cls, rule in builtin:
        name = cls.__name__
        hits = [r for r in rows if name in r or (name == "_BatchNorm" and "BatchNorm" in r)]
        assert hits, f"no row for {name} ({rule.name}) in docs/layers.md"
        assert hits[0].count("| rule ") == 3, hits[0]  # EXACT, EMPIRICAL, MONTE_CARLO
    assert any("Conv1D" in r for r in rows)  # Hugging Face's, matched by name at run time
    assert len(rows) == len(builtin) + 1


def test_every_page_is_in_the_nav_and_the_screenshot_is_committed():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.glob("*.md"):
        assert page.name in nav, f"docs/{page.name} is not in the nav"
    shot = DOCS / "assets" / "screenshot-home.png"
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@needs_mkdocs
@pytest.mark.skipif(
    _chromium() is None,
    reason="no headless Chromium (apt-get install chromium) to render the built pages",
)
def test_home_and_api_pages_render_in_a_headless_browser(site, tmp_path):
    browser = _chromium()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    pages = {
        "index.html": ["diagonal of the Fisher Information Matrix", "HUTCHINSON_RANKK"],
        "api/index.html": ["DiagFisher", "diag_fim_step", "DiagFIM", "available_backends"],
    }
    for page, words in pages.items():
        url = (site / page).as_uri()
        dom = subprocess.run(
            [browser, *flags, "--virtual-time-budget=5000", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert dom.returncode == 0, dom.stderr[-2000:]
        for word in words:
            assert word in dom.stdout, f"{page}: {word!r} is not in the rendered page"
        shot = tmp_path / (page.replace("/", "_") + ".png")
        r = subprocess.run(
            [browser, *flags, "--window-size=1280,900", f"--screenshot={shot}", url],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
        import matplotlib.image

        img = matplotlib.image.imread(shot)
        assert img.shape[:2] == (900, 1280)
        assert img[..., :3].std() > 0.05  # a page was drawn, not a blank window
