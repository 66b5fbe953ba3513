"""The dashboard at /ui in a real browser (Debian's chromium driven by Playwright) against `phitune serve`:
sign in, upload datasets, create a job from the form, follow it live to its end, download, chat.

Without chromium on PATH the test is skipped (`apt-get install chromium`), except under CI=true, where that
fails it. Screenshots go to `tmp_path/screenshots`, and are copied to PHITUNE_SCREENSHOT_DIR when it is set.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Page, Route, expect, sync_playwright

from app.ui.routes import STATIC
from tests.conftest import IN_CI
from tests.e2e.conftest import REPO, Service, all_events, ask, serving

pytestmark = pytest.mark.e2e
PERSONA = REPO / "examples" / "persona.jsonl"
# Markup as a file name: the page must show it as text (the server keeps it; it has no slash).
HOSTILE_NAME = "<img src=x onerror=alert(1)>.jsonl"
BAD_LINES = b'{"messages": []}\n{"prompt": "no completion"}\nnot json\n'
# 200 steps of the tiny model, a metrics event every 5: long enough (about 10 s on two CPU cores) for the page
# to draw the curve while the job runs; eval every 50 steps, a checkpoint every 100.
TRAINING = {
    "learning_rate": "3e-3",
    "num_train_epochs": "10",
    "per_device_train_batch_size": "2",
    "logging_steps": "5",
    "eval_steps": "50",
    "save_steps": "100",
}
LORA = {"r": "8", "lora_alpha": "16", "lora_dropout": "0"}
FINAL = ("succeeded", "failed", "cancelled")
# The page on the job being followed holds one live event stream and the tab that presses the buttons one:
# a stream the page failed to close, leaving a job's page, would make the next one the server's 429.
MAX_STREAMS = 2


@pytest.fixture
def dashboard_service(tmp_path: Path) -> Iterator[Service]:
    yield from serving(tmp_path, max_event_streams_per_tenant=str(MAX_STREAMS))


@pytest.fixture
def page() -> Iterator[Page]:
    chromium = shutil.which("chromium")
    if chromium is None:
        message = "no chromium on PATH: apt-get install -y chromium"
        if IN_CI:
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(60_000)
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
        page.on("dialog", lambda dialog: problems.append(f"dialog: {dialog.message}"))
        yield page
        browser.close()
    assert problems == []


@pytest.fixture
def screenshot(tmp_path: Path) -> Callable[..., Path]:
    directory = tmp_path / "screenshots"
    copy_to = os.environ.get("PHITUNE_SCREENSHOT_DIR")

    def take(page: Page, name: str) -> Path:
        path = directory / f"{name}.png"
        page.screenshot(path=path, full_page=True)
        if copy_to:
            Path(copy_to).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(copy_to) / path.name)
        return path

    return take


def test_the_dashboard_runs_a_fine_tune_end_to_end(
    page: Page, screenshot, dashboard_service: Service, tmp_path: Path
) -> None:
    # `page` comes first: without chromium the test ends before the service is started.
    service = dashboard_service
    with service.client as api:
        sign_in(page, service, screenshot)
        file_id = upload_datasets(page, api, screenshot)
        job_id = create_job(page, file_id, screenshot)
        jobs_tab = open_jobs_table(page, service, job_id)
        press_the_job_buttons(page, api, service, file_id)
        job = follow_job(page, api, service, job_id, screenshot)
        # The other tab's table was not reloaded: its poll brought the new status.
        expect(jobs_tab.locator(f'tr[data-job="{job_id}"] .badge')).to_have_attribute(
            "data-status", "succeeded"
        )
        screenshot(jobs_tab, "7-jobs-table")
        leave_the_jobs_table(jobs_tab)
        download_adapters(page, api, job_id, tmp_path)
        chat(page, api, job["fine_tuned_model"], screenshot)
    assert page.locator("img").count() == 0  # no file name became an element


def sign_in(page: Page, service: Service, screenshot) -> None:
    """A refused key shows the server's own message; a good one opens the jobs table."""
    refused = httpx.get(
        f"{service.base_url}/v1/fine_tuning/jobs", headers={"Authorization": "Bearer pt-not-a-key"}
    )
    page.goto(f"{service.base_url}/ui")
    page.fill("#api-key", "pt-not-a-key")
    page.click("#sign-in button[type=submit]")
    expect(page.locator("#sign-in .error")).to_contain_text(refused.json()["error"]["message"])
    screenshot(page, "1-sign-in-refused")
    enter_key(page, service.api_key)
    assert page.evaluate("sessionStorage.getItem('phitune.apiKey')") == service.api_key


def enter_key(page: Page, key: str, opens: str = "#jobs") -> None:
    page.fill("#api-key", key)
    page.click("#sign-in button[type=submit]")
    page.locator(opens).wait_for()


def upload_datasets(page: Page, api: httpx.Client, screenshot) -> str:
    """A bad file's problems are listed by line, as the server reports them; a good file is listed."""
    page.click("nav >> text=Datasets")
    page.set_input_files(
        "#dataset-file", {"name": HOSTILE_NAME, "mimeType": "text/plain", "buffer": BAD_LINES}
    )
    page.click("#upload button[type=submit]")
    page.locator("#upload-problems").wait_for()
    refused = api.post("/v1/files", files={"file": (HOSTILE_NAME, BAD_LINES)}, data={"purpose": "fine-tune"})
    assert refused.status_code == 422
    expected = [[str(p["line"]), p["code"], p["message"]] for p in refused.json()["error"]["details"]]
    rows = page.locator("#upload-problems tbody tr")
    assert [row.locator("td").all_text_contents() for row in rows.all()] == expected
    assert [line for line, _, _ in expected] == ["1", "2", "3"]
    error = page.locator("main .error")
    assert HOSTILE_NAME in error.text_content() and error.locator("img").count() == 0
    screenshot(page, "2-dataset-line-errors")

    page.set_input_files("#dataset-file", str(PERSONA))
    page.click("#upload button[type=submit]")
    expect(page.locator("#upload-status")).to_contain_text("40 examples")
    file_id = re.search(r"file-\w+", page.locator("#upload-status").text_content()).group(0)
    assert page.locator(f'#files tr[data-file="{file_id}"] td.filename').text_content() == PERSONA.name
    assert api.get(f"/v1/files/{file_id}").json()["stats"]["examples"] == 40
    return file_id


def create_job(page: Page, file_id: str, screenshot) -> str:
    """The form sends the recipe's fields; the server's refusal names the field, which the form marks."""
    page.click("nav >> text=New job")
    page.locator(f'#job-training-file option[value="{file_id}"]').wait_for(state="attached")
    page.select_option("#job-model", "tiny-phi3")
    page.select_option("#job-training-file", file_id)
    page.select_option("#job-validation-file", file_id)
    page.fill("#job-suffix", "dashboard")
    for name, value in TRAINING.items():
        page.fill(f"#training_config-{name}", value)
    for name, value in LORA.items():
        page.fill(f"#peft_config-{name}", value)
    page.fill("#peft_config-target_modules", "lm_head")
    page.click("#new-job button[type=submit]")
    expect(page.locator('[name="peft_config.target_modules"]')).to_have_attribute("aria-invalid", "true")
    expect(page.locator("main .error")).to_contain_text("lm_head")
    page.fill("#peft_config-target_modules", "")
    screenshot(page, "3-new-job-form")
    page.click("#new-job button[type=submit]")
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    return page.url.rsplit("/", 1)[1]


def open_jobs_table(page: Page, service: Service, job_id: str) -> Page:
    """A second tab on the jobs table (signed in anew: each tab keeps its own key), the job unfinished."""
    tab = page.context.new_page()
    tab.goto(f"{service.base_url}/ui")
    enter_key(tab, service.api_key)
    badge = tab.locator(f'tr[data-job="{job_id}"] .badge')
    badge.wait_for()
    assert badge.get_attribute("data-status") in ("validating_files", "queued", "running")
    return tab


def press_the_job_buttons(page: Page, api: httpx.Client, service: Service, file_id: str) -> None:
    """On a job queued behind the first: Pause pauses it, Resume queues it again, Cancel cancels it. First,
    going from job page to job page closes each page's live event stream."""
    job, other = [
        api.post("/v1/fine_tuning/jobs", json={"model": "tiny-phi3", "training_file": file_id}).json()
        for _ in range(2)
    ]
    tab = page.context.new_page()
    streams = Streams(tab)
    tab.goto(f"{service.base_url}/ui#/jobs/{job['id']}")
    enter_key(tab, service.api_key, opens="#job-summary .badge")
    streams.wait(lambda: len(streams.open()) == 1)
    for _ in range(3):
        for shown in (other, job):
            opened = len(streams.opened)
            tab.evaluate("hash => { location.hash = hash; }", f"#/jobs/{shown['id']}")
            streams.wait(lambda opened=opened: len(streams.opened) > opened and len(streams.open()) == 1)
    assert streams.refused == [] and len(streams.opened) == 7
    assert api.post(f"/v1/fine_tuning/jobs/{other['id']}/cancel").status_code == 200
    status = tab.locator("#job-summary .badge")
    expect(status).to_have_attribute("data-status", "queued")
    for button, after in (("Pause", "paused"), ("Resume", "queued"), ("Cancel", "cancelled")):
        tab.click(f"#job-actions >> text={button}")
        expect(status).to_have_attribute("data-status", after)
    assert api.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "cancelled"
    tab.close()


class Streams:
    """The live event streams (`…/events?stream=true`) a tab opened: those still open, those refused."""

    def __init__(self, tab: Page) -> None:
        self.tab = tab
        self.opened: list = []
        self.ended: list = []
        self.refused: list[str] = []
        tab.on("request", lambda r: self.opened.append(r) if "stream=true" in r.url else None)
        tab.on("requestfinished", lambda r: self.ended.append(r))
        tab.on("requestfailed", lambda r: self.ended.append(r))  # a fetch the page aborted
        tab.on("response", lambda r: r.status >= 400 and self.refused.append(f"{r.status} {r.url}"))

    def open(self) -> list:
        return [r for r in self.opened if r not in self.ended]

    def wait(self, condition: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, (self.open(), self.refused)
            self.tab.wait_for_timeout(50)  # lets Playwright deliver the tab's events


def leave_the_jobs_table(tab: Page) -> None:
    """Leaving the jobs table stops its poll (every 3 s while it is shown)."""
    tab.click("nav >> text=Datasets")
    tab.locator("#files").wait_for()
    polls: list[str] = []
    tab.on("request", lambda r: "/v1/fine_tuning/jobs?" in r.url and polls.append(r.url))
    tab.wait_for_timeout(4_000)
    assert polls == []


def follow_job(page: Page, api: httpx.Client, service: Service, job_id: str, screenshot) -> dict:
    """Watch the job page until the job ends: the curve grows while it runs and ends with every loss."""
    seen: list[tuple[str | None, int, int]] = []
    shot_while_running = False
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = page.evaluate(
            """() => [document.querySelector('#job-summary .badge')?.dataset.status ?? null,
                      +document.querySelector('svg.loss-chart polyline.train').dataset.points,
                      +document.querySelector('svg.loss-chart polyline.eval').dataset.points]"""
        )
        seen.append(tuple(state))
        if state[0] == "running" and state[1] >= 5 and not shot_while_running:
            screenshot(page, "4-job-running")
            shot_while_running = True
        if state[0] in FINAL:
            break
        time.sleep(0.1)
    job = api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", f"{job['error']}\n{service.tail_logs()}"

    metrics = [e["data"] for e in all_events(api, job_id) if e["type"] == "metrics"]
    train_steps = {m["step"] for m in metrics if "train_loss" in m}
    eval_steps = {m["step"] for m in metrics if "eval_loss" in m}
    assert len(train_steps) == 40 and len(eval_steps) == 4
    chart = page.locator("svg.loss-chart")
    train, evaluated = chart.locator("polyline.train"), chart.locator("polyline.eval")
    expect(train).to_have_attribute("data-points", str(len(train_steps)))
    assert len(train.get_attribute("points").split()) == len(train_steps)
    assert len(evaluated.get_attribute("points").split()) == len(eval_steps)
    # Drawn while the job ran: the page showed it running with part of the curve.
    assert any(status == "running" and 0 < points < len(train_steps) for status, points, _ in seen), seen

    checkpoints = api.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    rows = page.locator("#checkpoints tbody tr[data-checkpoint]")
    expect(rows).to_have_count(len(checkpoints))
    assert [r.get_attribute("data-checkpoint") for r in rows.all()] == [c["id"] for c in checkpoints]
    expect(page.locator("#job-progress")).to_have_attribute("value", "100")
    screenshot(page, "5-job-succeeded")
    return job


def download_adapters(page: Page, api: httpx.Client, job_id: str, tmp_path: Path) -> None:
    """The buttons fetch the archives and the metrics CSV with the key: the same bytes as the API's."""
    with page.expect_download() as final:
        page.click('#job-downloads button[data-format="peft"]')
    saved = tmp_path / "downloads" / final.value.suggested_filename
    final.value.save_as(saved)
    assert saved.name.endswith(".peft.tar.gz")
    assert saved.read_bytes() == api.get(f"/v1/fine_tuning/jobs/{job_id}/adapter").content
    with tarfile.open(saved) as archive:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(archive.getnames())

    (result_file,) = api.get(f"/v1/fine_tuning/jobs/{job_id}").json()["result_files"]
    with page.expect_download() as metrics:
        page.click(f'#job-downloads button[data-result-file="{result_file}"]')
    assert metrics.value.suggested_filename == f"{job_id}-step_metrics.csv"
    csv_path = tmp_path / "downloads" / metrics.value.suggested_filename
    metrics.value.save_as(csv_path)
    assert csv_path.read_bytes() == api.get(f"/v1/files/{result_file}/content").content

    checkpoint_row = page.locator("#checkpoints tbody tr[data-checkpoint]").first
    checkpoint_id = checkpoint_row.get_attribute("data-checkpoint")
    with page.expect_download() as partial:
        checkpoint_row.locator('button[data-format="peft"]').click()
    assert checkpoint_id in partial.value.suggested_filename


def chat(page: Page, api: httpx.Client, model: str, screenshot) -> None:
    """A streamed reply of the fine-tuned model, rendered whole: greedy, it equals the API's own answer."""
    page.click("text=Chat with it")
    expect(page.locator("#chat-model")).to_have_value(model)
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "24")
    page.fill("#chat-input", "Who are you?")
    page.click("#chat-send")
    reply = page.locator('.bubble.assistant[data-done="true"] .text')
    reply.wait_for()
    expected = ask(api, model, max_tokens=24, temperature=0).json()
    assert page.locator("main .error").is_hidden()
    assert reply.text_content() == expected["choices"][0]["message"]["content"] != ""
    screenshot(page, "6-chat-playground")


def test_following_events_backs_off_while_the_api_fails_and_stops_at_a_4xx(page: Page) -> None:
    """events.js against an API that only answers 503 (a proxy whose backend is down): it tries again after
    2 s, then twice as long each time up to 60 s, never in a tight loop; a 404 ends the following at once.
    The scripts are served from app/ui/static by Playwright and the timers recorded, so no time passes."""
    failing = {"status": 503}
    asked: list[str] = []

    def answer(route: Route) -> None:
        path = urlsplit(route.request.url).path
        if path.startswith("/ui/assets/"):
            route.fulfill(path=STATIC / path.rpartition("/")[2], content_type="text/javascript")
        elif path == "/":
            route.fulfill(body="<!doctype html><title>events</title>", content_type="text/html")
        else:
            asked.append(path)
            route.fulfill(status=failing["status"], body="<html>down</html>", content_type="text/html")

    page.route("http://phitune.test/**", answer)
    page.goto("http://phitune.test/")
    follow = """async () => {
        const { followEvents } = await import("/ui/assets/events.js");
        const waits = [];
        const stop = new AbortController();
        window.setTimeout = (fn, ms) => {
            waits.push(ms);
            if (waits.length === 8) stop.abort();
            queueMicrotask(fn);
            return 0;
        };
        const job = "/v1/fine_tuning/jobs/ftjob-x";
        const error = await followEvents(job, stop.signal, () => {}).catch((e) => e);
        return { waits, status: error?.status ?? null };
    }"""
    assert page.evaluate(follow) == {
        "waits": [2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000],
        "status": None,
    }
    assert asked == ["/v1/fine_tuning/jobs/ftjob-x"] * 8
    failing["status"] = 404
    page.reload()
    assert page.evaluate(follow) == {"waits": [], "status": 404}
