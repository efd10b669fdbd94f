"""The chat page at `/` in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
selenium): a message sent from the page streams back the model's answer."""

from __future__ import annotations

import shutil

import pytest

from opengpt.api import Completion
from opengpt.server.app import ServerConfig, create_app
from tests.server.conftest import live_server

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                                   reason="needs Debian's chromium and chromium-driver")]


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_chat_page_streams_an_answer(llm, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    question = "What is the weather in Paris today?"
    expected = Completion()
    for _ in llm.run(llm.tokenizer.encode_chat([{"role": "user", "content": question}]), expected, temperature=0):
        pass
    app = create_app(llm, ServerConfig(model_names=["tiny"]))
    with live_server(app) as url:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").get_attribute("value") == "tiny")
        browser.execute_script("document.getElementById('temperature').value = '0'")
        browser.find_element(By.ID, "input").send_keys(question)
        browser.find_element(By.ID, "send").click()
        done = WebDriverWait(browser, 60).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true'], .error"))
        assert "error" not in done[0].get_attribute("class"), done[0].text
        answer = browser.execute_script("return document.querySelector('.assistant').textContent")
        assert answer == expected.text and answer
        assert browser.find_element(By.CSS_SELECTOR, ".user").text == question
    assert 'route="/v1/chat/completions",status="200"' in app.state.metrics.render()
