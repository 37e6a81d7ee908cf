"""The playground page in a real headless browser (Debian's Chromium, driven by Selenium): type a prompt, press
Generate, and see the student's image beside the final one with the path, score, cost and latency; a budget sets
the cut-off. The server runs in this process on 127.0.0.1 (uvicorn in a thread)."""

from __future__ import annotations

import os
import shutil
import socket
import threading

import pytest
from servetools import wait_until_ready

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Chromium and chromedriver (Debian: apt-get "
                                 "install chromium chromium-driver; .ci/run installs them)")]


@pytest.fixture(scope="module")
def url(one_thread):
    import uvicorn

    from tandem import TandemPipeline
    from tandem.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(TandemPipeline.from_pretrained("world")), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(base, 30)
    yield base
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def generate(browser, url: str, prompt: str, budget: str = "", seed: str = "0") -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    for field, value in (("prompt", prompt), ("budget", budget), ("seed", seed)):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 120).until(lambda d: d.find_element(By.ID, "record").text.startswith("path:")
                                      or d.find_element(By.ID, "error").text)
    error = browser.find_element(By.ID, "error").text
    assert not error, error
    return browser.find_element(By.ID, "record").text


def test_the_playground_draws_and_shows_the_path_score_and_cost(browser, url, tmp_path):
    from selenium.webdriver.common.by import By

    text = generate(browser, url, "a blue square to the left of a yellow triangle", seed="0")
    assert text.splitlines()[0] == "path: refined"  # the oracle rejected this student image (offline too)
    assert "score: " in text and "UNet evaluations: " in text and "latency: " in text
    for image in ("student", "final"):
        img = browser.find_element(By.ID, image)
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        assert browser.execute_script("return arguments[0].naturalWidth", img) == 32
    shot = os.environ.get("TANDEM_PLAYGROUND_SCREENSHOT", str(tmp_path / "playground.png"))
    browser.save_screenshot(shot)


def test_a_budget_below_the_students_cost_keeps_every_student_image(browser, url):
    # the budget is a mean of UNet evaluations per image: at 4, the 4-step student's own cost, the route table picks
    # the student alone (a cut-off of -inf, which JSON shows as none) and no image goes to the teacher
    text = generate(browser, url, "two small green triangles", budget="4", seed="1")
    assert text.splitlines()[:2] == ["path: accepted", "score: 0.037 (tau none)"] and "teacher 0.0" in text
