"""The dashboard's page and assets: public, each with its content type and a strict Content-Security-Policy,
and written so that the policy holds (no inline script or style) and user text never becomes markup."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from html.parser import HTMLParser

import pytest

from app.ui.routes import ASSETS, STATIC
from phitune.launch import REPO

TYPES = {".js": "text/javascript", ".css": "text/css"}
# Ways of turning a string into markup or code; the dashboard builds every element with createElement.
HTML_SINKS = re.compile(
    r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|srcdoc"
)


class Page(HTMLParser):
    """The assets an HTML page loads, and whether it has inline scripts, styles or event handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.inline: list[str] = []
        self._tag: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self._tag = tag
        self.loads += [found[a] or "" for a in ("src", "href") if a in found and tag in ("script", "link")]
        self.inline += [f"{tag} {name}" for name, _ in attrs if name.startswith("on") or name == "style"]

    def handle_endtag(self, tag: str) -> None:
        self._tag = None

    def handle_data(self, data: str) -> None:
        if self._tag in ("script", "style") and data.strip():
            self.inline.append(f"{self._tag} body")


def test_the_page_is_public_with_a_strict_policy(client) -> None:
    response = client.get("/ui")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = dict(d.strip().split(" ", 1) for d in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == policy["style-src"] == policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_a_trailing_slash_leads_to_the_page(client) -> None:
    response = client.get("/ui/", follow_redirects=False)
    assert response.status_code in (307, 308)
    assert response.headers["location"].endswith("/ui")


def test_the_page_loads_only_served_assets_and_nothing_inline(client) -> None:
    page = Page()
    page.feed(client.get("/ui").text)
    loaded = [url for url in page.loads if not url.startswith("data:")]
    assert loaded and page.inline == []
    for url in loaded:
        assert client.get(url).status_code == 200, url


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_each_asset_has_its_type_and_the_policy(client, name: str) -> None:
    response = client.get(f"/ui/assets/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == f"{TYPES[name[name.rindex('.') :]]}; charset=utf-8"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert response.content == (STATIC / name).read_bytes()


def test_every_module_the_scripts_import_is_served(client) -> None:
    imported = {
        found
        for name in ASSETS
        if name.endswith(".js")
        for found in re.findall(r'from "\./([\w.-]+)"', (STATIC / name).read_text())
    }
    assert imported and imported <= set(ASSETS)


@pytest.mark.parametrize("path", ["/ui/assets/nope.js", "/ui/assets/index.html", "/ui/assets/..%2Froutes.py"])
def test_nothing_else_is_served(client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "error" in response.json()


def test_no_script_turns_strings_into_markup() -> None:
    sinks = {name: HTML_SINKS.findall((STATIC / name).read_text()) for name in ASSETS if name.endswith(".js")}
    assert sinks and all(found == [] for found in sinks.values()), sinks


def test_every_link_the_scripts_make_stays_in_the_page() -> None:
    """A link's href is a literal `#/…` route (the data in it URI-encoded) or a download's blob: URL, never a
    string from the server, which could be `javascript:…`."""
    scripts = {name: (STATIC / name).read_text() for name in ASSETS if name.endswith(".js")}
    props = [
        (name, value) for name, text in scripts.items() for value in re.findall(r"\bhref:\s*(\S+)", text)
    ]
    assert props and all(re.match(r"[`\"]#/", value) for _, value in props), props
    for value in re.findall(r"`#/[^`]*`", " ".join(v for _, v in props)):
        assert all(part.startswith("encodeURIComponent(") for part in re.findall(r"\$\{([^}]*)\}", value)), (
            value
        )
    assigned = [value for text in scripts.values() for value in re.findall(r"\.href\s*=\s*([^;]+);", text)]
    assert assigned == ["url"] and "const url = URL.createObjectURL(blob);" in scripts["api.js"]


def test_every_static_file_is_packaged() -> None:
    """setuptools puts data files in the wheel (and the API's image) only as package-data lists them."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = [p.removeprefix("static/") for p in project["tool"]["setuptools"]["package-data"]["app.ui"]]
    assert [p.name for p in STATIC.iterdir() if not any(fnmatch(p.name, x) for x in patterns)] == []
