"""The web page (`GET /`) in headless Chromium against the server on the tiny random model: a chat message with an
image streams the answer the API gives, and a video file streams into a live session that answers questions.

Chromium: ``IVL_CHROMIUM`` (an executable), playwright's own (``playwright install chromium``), or the one
`tests/browser/package.json` fetches from the npm registry (``npm install --prefix tests/browser``). Without any,
the test skips and says how to get one. ``IVL_PAGE_SCREENSHOT=path`` also saves a screenshot there (the README's).
"""

import base64
import os
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
import requests
from PIL import Image

from ivl.serve.launch import running_server

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the [dev] extra)")

KEY = "page-key"
NPM_CHROMIUM = Path(__file__).parent / "browser"
# Chromium's own flags for a container: no setuid sandbox or zygote, software rendering.
ARGS = ["--no-sandbox", "--no-zygote", "--disable-gpu", "--autoplay-policy=no-user-gesture-required"]


def chromium() -> str | None:
    """An executable path, "" for playwright's own browser, or None when there is none."""
    if os.environ.get("IVL_CHROMIUM"):
        return os.environ["IVL_CHROMIUM"]
    with sync_api.sync_playwright() as p:
        if Path(p.chromium.executable_path).exists():
            return ""
    if (NPM_CHROMIUM / "node_modules" / "@sparticuz" / "chromium").exists() and shutil.which("node"):
        # the package unpacks its (brotli-compressed) build into the temporary folder and says where
        script = "import('@sparticuz/chromium').then(async m => console.log(await m.default.executablePath()))"
        done = subprocess.run(["node", "-e", script], cwd=NPM_CHROMIUM, capture_output=True, text=True, timeout=300)
        if done.returncode == 0 and Path(done.stdout.strip()).exists():
            return done.stdout.strip()
    return None


@pytest.fixture(scope="module")
def browser():
    path = chromium()
    if path is None:
        pytest.skip("no Chromium: npm install --prefix tests/browser, or playwright install chromium, or IVL_CHROMIUM")
    with sync_api.sync_playwright() as p:
        try:
            launched = p.chromium.launch(executable_path=path or None, args=ARGS, timeout=120_000)
        except sync_api.Error as error:  # e.g. a system library the build needs is missing on this machine
            pytest.skip(f"Chromium {path or '(playwright)'} does not start here: {str(error).splitlines()[0]}")
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(
        "--max-context",
        "2048",
        log_path=tmp_path_factory.mktemp("log") / "server.log",
        env={"IVL_API_KEY": KEY, "OMP_NUM_THREADS": "1"},
    ) as (url, _):
        yield url


def api_answer(url, content) -> str:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 256, "temperature": 0}
    response = requests.post(
        url + "/v1/chat/completions", json=body, timeout=120, headers={"Authorization": f"Bearer {KEY}"}
    )
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def test_a_message_with_an_image_streams_the_answer_the_api_gives(browser, server, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (220, 30, 30)).save(image)
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.on("dialog", lambda dialog: dialog.accept(KEY))  # the page asks for the API key once
    page.goto(f"{server}/")
    page.set_input_files("#image", str(image))
    page.fill("#prompt", "What colour is this picture?")
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state=done], .msg.error", timeout=120_000)
    answer = page.locator(".msg.assistant").last
    assert answer.get_attribute("data-state") == "done", answer.text_content()
    assert page.locator(".msg.user img").count() == 1

    data_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    expected = api_answer(
        server,
        [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": "What colour is this picture?"},
        ],
    )
    assert expected and answer.text_content() == expected
    if os.environ.get("IVL_PAGE_SCREENSHOT"):
        page.screenshot(path=os.environ["IVL_PAGE_SCREENSHOT"])
    page.close()


def webm(path: Path, frames: int = 40) -> Path:
    """A short VP8 clip of a moving square (open codecs: Chromium plays it without proprietary ones)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=10)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for i in range(frames):
            pixels = np.full((96, 128, 3), 30, np.uint8)
            pixels[30:60, 3 * i : 3 * i + 30] = (240, 200, 0)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_a_video_file_streams_into_a_session_that_answers(browser, server, tmp_path):
    page = browser.new_page()
    page.add_init_script(f"localStorage.setItem('ivl-api-key', '{KEY}')")  # kept from an earlier visit
    page.goto(f"{server}/")
    page.set_input_files("#file", str(webm(tmp_path / "clip.webm")))
    # frames go to the session two at a time, twice a second; the status line counts them
    page.wait_for_function(
        "document.getElementById('status').textContent.includes('frames in the session')", timeout=60_000
    )
    page.fill("#ask", "What moves?")
    page.click("#askButton")
    page.wait_for_function("document.getElementById('answers').textContent.includes('A (after')", timeout=120_000)
    answer = page.locator("#answers .msg").first.text_content()
    frames = int(answer.split("A (after ")[1].split(" frames")[0])
    assert frames >= 2 and "error" not in page.locator("#answers .msg").first.get_attribute("class")
    page.click("#stop")
    page.close()
