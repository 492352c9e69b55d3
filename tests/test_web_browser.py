"""The web chat (`python -m runtime.web`) in a real headless Chromium, and its parts without one.

The browser tests serve a tiny random checkpoint on a free localhost port, upload a held-out
shapes image, ask its question and read the streamed answer from the page: it must equal
test.py's answer. Two tabs asking at once each get their own answer (the queue runs one at a
time); a non-image and a too-large upload each show a message, the question asked after them is
refused rather than sent without its image, and the server keeps answering. A failed answer is
said on the status line, which covers nothing and stays. Screenshots go to the test's tmp dir and
to outputs/web_test_*.png.

They need Debian's `chromium` and `chromium-driver` (no browser download here) and are skipped,
loudly, without them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import answer_of_test_py, free_port, held_out, save_tiny_checkpoint
from PIL import Image

from dataprocess.boxes import Box, coco_to_qwen
from runtime.inference import GenerationSettings, InferenceSession

gr = pytest.importorskip("gradio", reason="gradio is not installed (requirements-web.txt)")

from runtime.web import app as web_app  # noqa: E402 - needs gradio
from runtime.web.chat import ChatInputError, session_inputs, settings_from  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
MAX_NEW_TOKENS = 8
SCREENSHOT = REPO / "outputs" / "web_test_screenshot.png"
GROUNDING_SCREENSHOT = REPO / "outputs" / "web_test_grounding.png"
ERROR_SCREENSHOT = REPO / "outputs" / "web_test_error.png"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_qwen_dir, tiny_clip_dir) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("web-ckpt"), tiny_qwen_dir, tiny_clip_dir)


@pytest.fixture(scope="module")
def session(checkpoint) -> InferenceSession:
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    return InferenceSession.from_checkpoint(checkpoint, dtype="float32", settings=settings)


def same_text(text: str) -> str:
    return " ".join(text.split())  # the page lays whitespace out its own way


# --- without a browser ---------------------------------------------------------------------------


def test_streamed_pieces_join_to_the_answer(session, shapes_dir):
    image, question = held_out(shapes_dir, 0)
    roles, contents = ["user"], [f"<image>\n{question}"]
    pieces = list(session.stream(roles, contents, [image]))
    assert len(pieces) > 1 and "".join(pieces) == session.answer(roles, contents, [image])
    stopped = session.stream(roles, contents, [image])
    next(stopped)
    stopped.close()  # the stop button: the generation thread ends, nothing hangs
    with pytest.raises(ValueError, match="marker"):
        list(session.stream(roles, ["no marker"], [image]))


class GroundingSession:
    """Streams a fixed answer in two pieces, as a grounding model would; `fail` makes it raise."""

    settings = GenerationSettings()
    fail = False

    def __init__(self, answer: str) -> None:
        self.pieces = [answer[:20], answer[20:]]

    def stream(self, roles, contents, images, settings):
        if self.fail:
            raise RuntimeError("out of memory")
        yield from self.pieces


def shape_box(image: Path) -> Box:
    """The grid box of a demo image's one coloured shape (its saturated pixels)."""
    pixels = np.asarray(Image.open(image).convert("RGB")).astype(int)  # [H, W, 3]
    ys, xs = np.nonzero(pixels.max(-1) - pixels.min(-1) > 60)
    height, width = pixels.shape[:2]
    xywh = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
    return coco_to_qwen(xywh, width, height)


def test_a_grounding_answer_is_drawn_and_a_failure_is_an_error_in_the_page(shapes_dir):
    image, question = held_out(shapes_dir, 0)
    fake = GroundingSession(
        "<ref>the circle</ref><box>(100,100),(500,600)</box> and <box>(1,2)</box>"
    )
    _, respond, _ = web_app._handlers(fake)
    turns = [{"role": "user", "text": question, "images": [str(image)]}]
    *_, (messages, answered, picture, legend, status) = respond(True, turns, 32, 0.0, 1.0)
    assert (
        answered[-1]["text"]
        == "<ref>the circle</ref><box>(100,100),(500,600)</box> and <box>(1,2)</box>"
    )
    assert messages[-1] == {"role": "assistant", "content": answered[-1]["text"]}
    assert isinstance(picture, Image.Image) and min(picture.size) >= 448
    assert legend.splitlines() == ["1: the circle (100,100),(500,600)",
                                   "not drawn: box '(1,2)' is not (x1,y1),(x2,y2)"]  # fmt: skip
    assert status == ""
    fake.fail = True  # said on the status line; the question stays, for Regenerate
    *_, (messages, kept, _, _, status) = respond(True, turns, 32, 0.0, 1.0)
    assert kept == turns and "Generation failed: RuntimeError: out of memory" in status
    assert [update for update in respond(False, turns, 32, 0.0, 1.0)] == [(gr.skip(),) * 5]
    add_turn, _, drop_answer = web_app._handlers(fake)
    *_, status, pending = add_turn(
        {"text": "Why?"}, "big.png (12.0 MB, over the 10.0 MB limit)", []
    )
    assert "Not sent: big.png" in status and pending is False
    *_, status, pending = drop_answer([])
    assert "Nothing to regenerate yet." in status and pending is False


def test_uploads_are_checked(tmp_path, monkeypatch):
    from runtime.web import chat

    image, text = tmp_path / "ok.png", tmp_path / "notes.png"
    Image.new("RGB", (20, 20)).save(image)
    text.write_text("not an image", encoding="utf-8")
    assert chat.checked_images([str(image)]) == [str(image)]
    with pytest.raises(ChatInputError, match=r"^notes.png is not an image that can be read\.$"):
        chat.checked_images([str(image), str(text)])  # no server path in the message
    monkeypatch.setattr(chat, "MAX_IMAGE_PIXELS", 399)
    with pytest.raises(ChatInputError, match="ok.png is 20x20 pixels; the limit is 399"):
        chat.checked_images([str(image)])
    for question in ("", "  ", "<image> what?"):
        with pytest.raises(ChatInputError):
            chat.user_turn(question, [str(image)])
    refused = ["big.png (12.0 MB, over the 10.0 MB limit)"]  # by the browser, before the server
    with pytest.raises(ChatInputError, match=r"Not sent: big.png \(12.0 MB, over the 10.0 MB"):
        chat.user_turn("What is it?", [], refused)


def test_settings_and_turns_of_the_page():
    base = GenerationSettings(top_k=5)
    greedy = settings_from(base, 16, 0.0, 1.0)
    assert (greedy.do_sample, greedy.max_new_tokens, greedy.top_k) == (False, 16, 5)
    assert settings_from(base, 16, 0.7, 0.9).do_sample
    for bad in [(0, 1.0, 1.0), (5000, 1.0, 1.0), (8, -1.0, 1.0), (8, 1.0, 0.0)]:
        with pytest.raises(ChatInputError):
            settings_from(base, *bad)
    turns = [{"role": "user", "text": "两张图有什么不同？", "images": ["a.png", "b.png"]},
             {"role": "assistant", "text": "颜色", "images": []},
             {"role": "user", "text": "And now?", "images": ["c.png"]}]  # fmt: skip
    roles, contents, images = session_inputs(turns)
    assert roles == ["user", "assistant", "user"]
    assert contents == ["<image>\n<image>\n两张图有什么不同？", "颜色", "<image>\nAnd now?"]
    assert images == ["a.png", "b.png", "c.png"]


def test_safe_defaults_and_a_password(tmp_path, caplog, capsys):
    from runtime.web.__main__ import parse_args, parse_auth

    caplog.set_level(logging.INFO, logger=web_app.__name__)
    args = parse_args([])
    assert (args.host, args.share, args.auth, args.max_file_size) == (
        "127.0.0.1",
        False,
        None,
        "10mb",
    )
    assert args.model_weights == "outputs/demo"
    assert parse_auth("ann:se:cret") == ("ann", "se:cret")
    for bad in ("ann", "ann:", ":pw"):
        with pytest.raises(ValueError, match="user:password"):
            parse_auth(bad)
    session = GroundingSession("x")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_TEMP_DIR", str(tmp_path))
        app = web_app.build_app(session)
        web_app.launch(app, port=free_port(), auth=("ann", "secret"), block=False)
    try:
        assert app.local_url.startswith("http://127.0.0.1:") and app.share_url is None
        assert app.local_url in caplog.text and "--share makes one" in caplog.text
        assert "share=True" not in capsys.readouterr().out  # Gradio's hint names its own API
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(app.local_url + "config")
        login = urllib.parse.urlencode({"username": "ann", "password": "secret"}).encode()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        assert opener.open(app.local_url + "login", login).status == 200
        assert opener.open(app.local_url + "config").status == 200
    finally:
        app.close()


# --- in Chromium ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Selenium and Debian's chromedriver; skipped, loudly, without."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("BROWSER TESTS SKIPPED: no chromium/chromedriver on PATH "
                    "(apt-get install chromium chromium-driver)")  # fmt: skip
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", "--lang=en-US"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@contextlib.contextmanager
def serving(session, uploads: Path):
    """The app of `session` on a free localhost port, uploads up to 100 KB; yields its URL."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_TEMP_DIR", str(uploads))
        app = web_app.build_app(session)
        web_app.launch(app, port=free_port(), max_file_size="100kb", block=False)
        try:
            yield app.local_url
        finally:
            app.close()


@pytest.fixture(scope="module")
def server(session, tmp_path_factory):
    with serving(session, tmp_path_factory.mktemp("gradio-uploads")) as url:
        yield url


def wait_for(condition, what: str, timeout: float = 30.0):
    """Poll `condition` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # the page re-renders while we look
            if result := condition():
                return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_for(lambda: driver.find_elements("css selector", "#question textarea"), "the page")


def attach(driver, *files: Path) -> None:
    """Attach `files` to the question box; returns once each is uploaded or refused."""
    for file in files:
        driver.find_element("css selector", "#question input[type=file]").send_keys(str(file))
    wait_for(lambda: len(driver.find_elements("css selector", "#question img")) >= len(files)
             or driver.find_elements("css selector", "[data-testid='toast-body']"),
             "the upload")  # fmt: skip


def send(driver, question: str, *files: Path) -> None:
    """Attach `files` and submit `question` with Enter."""
    if files:
        attach(driver, *files)
    box = driver.find_element("css selector", "#question textarea")
    box.send_keys(question)
    box.send_keys("\n")


def answers(driver) -> list[str]:
    return [e.text for e in driver.find_elements("css selector", "#chatbot [data-testid='bot']")]


def finished_answer(driver, count: int) -> str:
    """The `count`-th answer once generation has ended (the question box is enabled again)."""

    def done():
        box = driver.find_element("css selector", "#question textarea")
        return len(answers(driver)) >= count and box.is_enabled()

    wait_for(done, f"answer {count}")
    return answers(driver)[count - 1]


def screenshot(driver, path: Path, stable: Path) -> None:
    """A test artifact in the tmp dir, copied to a stable path under outputs/ (git-ignored)."""
    driver.save_screenshot(str(path))
    assert Image.open(path).size[0] > 0
    stable.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, stable)


def status(driver) -> str:
    """The status line under the question box."""
    return driver.find_element("id", "status").text


def toasts(driver) -> str:
    return " ".join(
        e.text for e in driver.find_elements("css selector", "[data-testid='toast-body']")
    )


@pytest.mark.browser
def test_the_page_answers_as_test_py_does(browser, server, checkpoint, shapes_dir, tmp_path):
    image, question = held_out(shapes_dir, 0)
    expected = answer_of_test_py(checkpoint, image, question)
    assert expected.strip(), "the tiny model answered nothing; pick another image"
    open_page(browser, server)
    send(browser, question, image)
    assert same_text(finished_answer(browser, 1)) == same_text(expected)
    assert question in browser.find_element("id", "chatbot").text
    screenshot(browser, tmp_path / "web_chat.png", SCREENSHOT)


@pytest.mark.browser
def test_two_tabs_asking_at_once_get_their_own_answers(browser, server, checkpoint, shapes_dir):
    asks = [held_out(shapes_dir, index) for index in (1, 2)]
    expected = [answer_of_test_py(checkpoint, image, question) for image, question in asks]
    first = browser.current_window_handle
    open_page(browser, server)
    browser.switch_to.new_window("tab")
    second = browser.current_window_handle
    open_page(browser, server)
    for handle, (image, question) in zip((first, second), asks, strict=True):
        browser.switch_to.window(handle)
        send(browser, question, image)
    for handle, answer in zip((first, second), expected, strict=True):
        browser.switch_to.window(handle)
        assert same_text(finished_answer(browser, 1)) == same_text(answer)
    browser.close()
    browser.switch_to.window(first)


@pytest.mark.browser
def test_bad_uploads_show_a_message_and_the_server_keeps_serving(
    browser, server, checkpoint, shapes_dir, tmp_path
):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image", encoding="utf-8")
    fake = tmp_path / "fake.png"
    fake.write_text("not an image either", encoding="utf-8")
    large = tmp_path / "large.png"
    Image.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3)).save(large)  # ~270 KB
    refused = [  # (file, the message, refused when submitted rather than when uploaded)
        (notes, r"notes\.txt \(not an image\) could not be attached", False),
        (large, r"large\.png \(2\d\d KB, over the 100 KB limit\) could not be", False),
        (fake, r"fake\.png is not an image", True),
    ]
    for file, message, on_submit in refused:
        open_page(browser, server)
        attach(browser, file)
        if not on_submit:  # refused at upload by Gradio: nothing stays attached
            wait_for(lambda: toasts(browser), "Gradio's message about the upload")
            assert not browser.find_elements("css selector", "#question img")
        send(browser, "What is this?")  # without its image the answer would be nonsense
        wait_for(lambda message=message: re.search(message, status(browser)), message)
        assert answers(browser) == []
        text = browser.find_element("css selector", "#question textarea").get_attribute("value")
        assert text == "What is this?"  # kept in its box, to be sent again
    image, question = held_out(shapes_dir, 0)
    open_page(browser, server)
    send(browser, question, image)
    expected = answer_of_test_py(checkpoint, image, question)
    assert same_text(finished_answer(browser, 1)) == same_text(expected)


@pytest.mark.browser
def test_an_answers_boxes_are_drawn_next_to_it(browser, shapes_dir, tmp_path):
    image, _ = held_out(shapes_dir, 3)
    box = shape_box(image)
    answer = f"<ref>the shape</ref>{box.text()} <box>(1,2)</box>"
    with serving(GroundingSession(answer), tmp_path / "uploads") as url:
        open_page(browser, url)
        send(browser, "Where is the shape? 图形在哪里？", image)
        assert same_text(finished_answer(browser, 1)) == same_text(answer)  # tags shown as text
        wait_for(lambda: browser.find_elements("css selector", "#boxes img"), "the drawing")
        legend = browser.find_element("css selector", "#legend textarea").get_attribute("value")
        assert legend.splitlines() == [f"1: the shape {box.coords()}",
                                       "not drawn: box '(1,2)' is not (x1,y1),(x2,y2)"]  # fmt: skip
        screenshot(browser, tmp_path / "web_grounding.png", GROUNDING_SCREENSHOT)


@pytest.mark.browser
def test_a_failed_answer_is_said_under_the_question_box_and_covers_nothing(
    browser, shapes_dir, tmp_path
):
    image, _ = held_out(shapes_dir, 0)
    failing = GroundingSession("unused")
    failing.fail = True
    with serving(failing, tmp_path / "uploads") as url:
        open_page(browser, url)
        send(browser, "What is it?", image)
        said = "Generation failed: RuntimeError: out of memory"
        wait_for(lambda: said in status(browser), "the reason on the status line")
        time.sleep(10.5)  # a toast would be gone by now
        assert said in status(browser)
        screenshot(browser, tmp_path / "web_error.png", ERROR_SCREENSHOT)
        badges = [e for e in browser.find_elements("xpath", "//*[normalize-space(text())='Error']")
                  if e.is_displayed()]  # fmt: skip
        assert badges == [] and toasts(browser) == ""  # nothing covers the chat or the question
        assert "What is it?" in browser.find_element("id", "chatbot").text
        assert browser.find_element("css selector", "#question textarea").is_enabled()
        shared = browser.find_elements("css selector", "#chatbot button[aria-label='Share']")
        downloads = browser.find_elements("css selector", "#chatbot a.download-link button")
        assert downloads and not any(button.is_displayed() for button in shared)
