"""The interactive report: what the runner keeps per pass, and the page in a real headless Chromium (Debian's
``chromium`` and ``chromium-driver``, driven through selenium): moving the slider and clicking a patch draw the
right numbers (read back from the page and its canvas), against maps and rows recomputed here, with no script
error."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import input_for, make_vit

import lightning_attn.runner as runner_module
from lightning_attn import ProbeOptions, ProbeRunner, Probes, attention_rollout
from lightning_attn.html_report import COLOUR_RANGE, report_html
from lightning_attn.render import colormap_lut, colour_values

import reference

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")


def _run(discard_ratio: float = 0.0, passes: int = 3) -> ProbeRunner:
    """Three passes of a tiny ViT whose weights move between them, so every step draws other maps."""
    model = make_vit("vit")  # 4 x 4 patches and a class token: 17 tokens, 3 layers of 3 heads
    probes = Probes(input_for("vit", batch=2), torch.tensor([0, 3]))
    options = ProbeOptions(discard_ratio=discard_ratio, head_layers=(1, 2), tile_size=16, class_names=None)
    runner = ProbeRunner(model, probes, options)
    generator = torch.Generator().manual_seed(5)
    for step in range(passes):
        if step:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
        runner.run(step=4 * step, render=False)
    return runner


def _positions(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference of the relative colour scale: t and the colour index of each patch."""
    shares = values / values.sum()
    n = values.size
    with np.errstate(divide="ignore"):
        t = np.where(shares > 0, np.clip(0.5 + 0.5 * np.log(shares * n) / math.log(COLOUR_RANGE), 0, 1), 0.0)
    return t, np.minimum(np.floor(t * 256), 255).astype(int)


# ---------------------------------------------------------------------------------------------- no browser


def test_each_pass_keeps_float16_maps_heads_and_token_matrices():
    runner = _run(passes=1)
    maps = runner.compute()[0]
    (entry,) = runner.report_history
    assert runner.report_layers == [0, 1, 2] and runner.report_head_layers == [1, 2]
    for method in ("raw", "rollout"):
        assert entry["maps"][method].dtype == torch.float16
        torch.testing.assert_close(entry["maps"][method], maps[method].half())
    torch.testing.assert_close(entry["matrices"][1], maps.matrices[1].half())
    assert entry["head_matrices"][2].shape == (2, 3, 17, 17) and set(entry["heads"]) == {1, 2}
    assert entry["predicted"].tolist() == maps.logits.argmax(-1).tolist()
    # only tensors, numbers, strings, lists and dicts: a weights-only load reads it back whole
    buffer = io.BytesIO()
    torch.save(runner.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = ProbeRunner(runner.model, runner.probes, runner.options)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.report_history[0]["matrices"][2], entry["matrices"][2])
    assert state["report_meta"]["grid_size"] == [4, 4] and state["report_meta"]["num_prefix_tokens"] == 1


def test_report_layers_by_default_only_when_small(monkeypatch):
    probes = Probes(input_for("vit", batch=2))
    model = make_vit("vit")
    assert ProbeRunner(model, probes, ProbeOptions()).report_layers == [0, 1, 2]
    monkeypatch.setattr(runner_module, "REPORT_MATRIX_BYTES", 3 * 2 * 17 * 17 * 2 - 1)  # a byte short of all three
    assert ProbeRunner(model, probes, ProbeOptions()).report_layers == []
    assert ProbeRunner(model, probes, ProbeOptions(report_layers=(-1,))).report_layers == [2]  # asked: kept
    assert ProbeRunner(model, probes, ProbeOptions(report_layers=())).report_layers == []
    with pytest.raises(ValueError, match="report_layers"):
        ProbeRunner(model, probes, ProbeOptions(report_layers=(3,)))
    with pytest.raises(ValueError, match="report_layers"):
        ProbeOptions(report_layers=1)


def test_the_page_is_self_contained_and_notebooks_frame_it():
    runner = _run(passes=1)
    page = report_html(runner.state_dict(), title="a </script> title")
    assert "http" not in page.replace("http-equiv", "") and not re.search(r"\b(src|href)\s*=", page)
    assert page.count("</script>") == 2  # the title's is escaped, in the JSON too
    frame = runner._repr_html_()
    assert frame.startswith("<iframe srcdoc=") and "la-data" in frame
    data = json.loads(re.search(r"id='la-data'>(.*?)</script>", page, re.S).group(1).replace("<\\/", "</"))
    assert [p["step"] for p in data["passes"]] == [0] and data["colour"]["range"] == COLOUR_RANGE


def test_a_state_without_the_report_shows_what_was_logged():
    """A checkpoint of a version that kept no report: the page shows the history's final-layer maps."""
    runner = _run(passes=2)
    state = {k: v for k, v in runner.state_dict().items() if k not in ("report", "report_meta")}
    data = json.loads(re.search(r"id='la-data'>(.*?)</script>", report_html(state), re.S).group(1))
    assert [p["step"] for p in data["passes"]] == [0, 4] and data["meta"]["layer_names"] == ["final layer"]
    shown = np.frombuffer(base64.b64decode(data["passes"][1]["maps"]["rollout"]["data"]), "<f2")
    np.testing.assert_array_equal(shown, runner.history[1][1].half().reshape(-1).numpy())
    with pytest.raises(ValueError, match="no logged pass"):
        report_html({**state, "history": []})


# ---------------------------------------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.skip(
            "no Chromium found (chromium and chromedriver): install Debian's `chromium chromium-driver` "
            "packages to run the browser tests"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra) drives Chromium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-proxy-server"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # a local driver: nothing downloaded
    driver.set_window_size(1200, 1400)
    yield driver
    driver.quit()


def _open(browser, runner: ProbeRunner, path: Path, hash_: str = "", **kwargs) -> None:
    path.write_text(report_html(runner.state_dict(), **kwargs), encoding="utf-8")
    browser.get(path.as_uri() + hash_)
    browser.get_log("browser")  # what an earlier page said is not this one's


def _errors(browser) -> list[dict]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def _check_drawn(browser, runner: ProbeRunner, expected: np.ndarray) -> dict:
    """What the page says it drew is ``expected`` (over the 4 x 4 patches), coloured on the relative scale, and
    the canvas holds those colours over the probe at each patch's centre."""
    drawn = browser.execute_script("return window.lightningAttn.drawn()")
    np.testing.assert_allclose(drawn["values"], expected.reshape(-1), rtol=1e-6, atol=1e-9)
    t, colours = _positions(expected.reshape(-1).astype(np.float64))
    np.testing.assert_allclose(drawn["t"], t, atol=1e-9)
    static = colour_values(
        torch.tensor(expected, dtype=torch.float32).reshape(4, 4), "relative", runner.options.colour_range
    )
    np.testing.assert_allclose(drawn["t"], static.reshape(-1).numpy(), atol=1e-6)  # what the grids draw
    assert drawn["colours"] == colours.tolist()
    lut = colormap_lut(runner.options.cmap).double().numpy()
    image = runner.state_dict()["display"][drawn["probe"]].double().numpy()  # (3, H, W) uint8 values
    h, w = image.shape[1:]
    pixels = browser.execute_script(
        "const c = document.getElementById('la-main'); return Array.from(c.getContext('2d').getImageData(0, 0, "
        "c.width, c.height).data)"
    )
    pixels = np.array(pixels).reshape(h, w, 4)
    alpha = runner.options.alpha
    for index, colour in enumerate(colours):
        y, x = (index // 4) * h // 4 + h // 8, (index % 4) * w // 4 + w // 8
        want = np.round(255 * (alpha * lut[colour] + (1 - alpha) * image[:, y, x] / 255))
        np.testing.assert_allclose(pixels[y, x, :3], want, atol=1)
    return drawn


def test_slider_and_patch_clicks_draw_the_right_numbers(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    runner = _run()
    history = runner.report_history
    _open(browser, runner, tmp_path / "report.html")
    view = browser.execute_script("return window.lightningAttn.view()")
    assert view == {"pass": 2, "method": "raw", "layer": 2, "probe": 0, "query": -1, "scale": "relative"}
    _check_drawn(browser, runner, history[2]["maps"]["raw"][0, 2].float().numpy())

    # the slider, moved by the keyboard as a user would: the previous pass, every panel with it
    slider = browser.find_element(By.ID, "la-step")
    slider.send_keys(Keys.ARROW_LEFT)
    drawn = _check_drawn(browser, runner, history[1]["maps"]["raw"][0, 2].float().numpy())
    assert drawn["step"] == 4 and "#step=4&" in browser.current_url

    # a click on the patch at row 1, column 2: its raw attention row at this layer and step
    canvas = browser.find_element(By.ID, "la-main")
    size = canvas.size
    ActionChains(browser).move_to_element_with_offset(
        canvas, int((2.5 / 4 - 0.5) * size["width"]), int((1.5 / 4 - 0.5) * size["height"])
    ).click().perform()
    query = 1 * 4 + 2
    drawn = _check_drawn(browser, runner, history[1]["matrices"][2][0, 1 + query, 1:].float().numpy())
    assert (drawn["query"], drawn["source"]) == (query, "raw row")
    heads = browser.execute_script("return window.lightningAttn.heads()")
    for head, tile in enumerate(heads):
        row = history[1]["head_matrices"][2][0, head, 1 + query, 1:].float().numpy()
        np.testing.assert_allclose(tile["values"], row, rtol=1e-6, atol=1e-9)

    # its rollout row, computed in the page from the stored matrices, against rollout.py on the same matrices
    browser.execute_script("window.lightningAttn.set({method: 'rollout', layer: 1})")
    fused = [history[1]["matrices"][layer][:, None].float() for layer in (0, 1)]  # (B, 1 "head", N, N)
    expected = attention_rollout(fused)[0, 1, 1 + query, 1:].numpy()
    drawn = browser.execute_script("return window.lightningAttn.drawn()")
    assert drawn["source"] == "rollout row"
    np.testing.assert_allclose(drawn["values"], expected, rtol=1e-5, atol=1e-7)
    # ... and the class token's rollout row there is the logged rollout map (the same convention)
    row = browser.execute_script("return window.lightningAttn.rolloutRow(1, 0, 2, 0)")
    np.testing.assert_allclose(row[1:], history[1]["maps"]["rollout"][0, 2].float().reshape(-1), atol=2e-3)

    # back to the class query; the view is in the URL, and reopening it restores it
    browser.find_element(By.ID, "la-class-query").click()
    assert browser.execute_script("return window.lightningAttn.view().query") == -1
    browser.find_element(By.CSS_SELECTOR, "#la-probes .la-tile:nth-child(2)").click()
    url = browser.current_url
    assert url.endswith("#step=4&method=rollout&layer=1&probe=1&query=class&scale=relative")
    browser.get(url.replace("query=class", "query=6").replace("probe=1", "probe=0"))
    view = browser.execute_script("return window.lightningAttn.view()")
    assert view == {"pass": 1, "method": "rollout", "layer": 1, "probe": 0, "query": 6, "scale": "relative"}
    assert _errors(browser) == []


def test_play_discard_ratio_and_per_map_colours(browser, tmp_path):
    from selenium.webdriver.common.by import By

    runner = _run(discard_ratio=0.25, passes=2)
    history = runner.report_history
    _open(browser, runner, tmp_path / "report.html", "#step=0&method=rollout&layer=2&probe=1&query=9")
    # the rollout row with the weakest quarter of each fused matrix discarded first, against the float64 reference
    fused = [history[0]["matrices"][layer][:, None].float() for layer in range(3)]
    expected = reference.rollout(fused, ratio=0.25)[1, 2, 1 + 9, 1:]
    drawn = browser.execute_script("return window.lightningAttn.drawn()")
    np.testing.assert_allclose(drawn["values"], expected, rtol=1e-5, atol=1e-7)
    # per-map colours: each map min-max stretched, its peak-to-uniform ratio said beside it
    browser.execute_script("window.lightningAttn.set({scale: 'per_map', query: -1})")
    drawn = browser.execute_script("return window.lightningAttn.drawn()")
    values = history[0]["maps"]["rollout"][1, 2].double().reshape(-1).numpy()
    t = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_allclose(drawn["t"], t, atol=1e-6)
    assert drawn["peak"] == pytest.approx(values.max() / values.sum() * 16, rel=1e-6)
    assert f"peak {drawn['peak']:.1f} x uniform" in browser.find_element(By.ID, "la-caption").text
    # the play button steps through the passes
    browser.find_element(By.ID, "la-play").click()
    deadline = time.monotonic() + 5
    while browser.execute_script("return window.lightningAttn.view().pass") != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert browser.execute_script("return window.lightningAttn.view().pass") == 1
    assert _errors(browser) == []
    # a page that keeps the rows of the last pass only: elsewhere a click shows the logged map, and says why
    _open(browser, runner, tmp_path / "thin.html", "#step=0&method=rollout&layer=2&probe=1&query=9", max_row_passes=1)
    drawn = browser.execute_script("return window.lightningAttn.drawn()")
    assert (
        drawn["source"] == "logged map"
        and "keeps the token x token attention of 1 passes" in browser.find_element(By.ID, "la-note").text
    )
    np.testing.assert_array_equal(drawn["values"], history[0]["maps"]["rollout"][1, 2].float().reshape(-1).numpy())
    browser.execute_script("window.lightningAttn.set({pass: 1})")
    assert browser.execute_script("return window.lightningAttn.drawn().source") == "rollout row"
    assert "step 4 *" in browser.find_element(By.ID, "la-step-label").text
    assert _errors(browser) == []
