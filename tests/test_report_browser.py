"""The report in a real browser (slow group): headless Chromium (Debian's chromium and chromium-driver)
opens outputs/report.html from a whole pipeline run on a tiny folder, with no server; every section,
every figure and the Bokeh UMAP render, and hovering or clicking a point shows its thumbnail.
Without Chromium the test fails with the line that installs it: it never skips."""
import shutil
import time

import pytest

from plankton import locations, registry

pytestmark = pytest.mark.slow
INSTALL = "apt-get install chromium chromium-driver"

# Every element matching a selector, inside Bokeh's shadow roots too.
FIND_ALL = """
function all(root, selector) {
  let found = [...root.querySelectorAll(selector)];
  for (const el of root.querySelectorAll('*')) if (el.shadowRoot) found = found.concat(all(el.shadowRoot, selector));
  return found;
}
"""
# The viewport position of the first point of the UMAP plot, from Bokeh's own scales, and its thumbnail.
POINT = """
const plot = Bokeh.documents[0].get_model_by_name('umap');
const view = Bokeh.index.find_one(plot);
view.el.scrollIntoView({block: 'center'});
const data = plot.renderers.find(r => r.data_source.data.x.length > 0).data_source.data;
const box = view.el.getBoundingClientRect();
return [box.left + view.frame.x_scale.compute(data.x[0]), box.top + view.frame.y_scale.compute(data.y[0]),
        data.thumb[0]];
"""


def chromium_driver():
    """Headless Chromium through Debian's chromedriver (never Selenium Manager, which would download one)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail(f"chromium or chromedriver not found: install them with `{INSTALL}`", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--hide-scrollbars"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def opened_report(tmp_path_factory, shared_run):
    tmp = tmp_path_factory.mktemp("report_browser")  # the screenshots
    page = locations.Paths.from_settings(shared_run.cfg).out / "report.html"
    browser = chromium_driver()
    try:
        with shared_run.lock:  # the page and its figures load while no other test edits the run
            browser.get(page.resolve().as_uri())
            browser.execute_script("return document.readyState")
            time.sleep(2)  # Bokeh draws after the page has loaded
        yield browser, tmp
    finally:
        browser.quit()


def test_every_section_and_figure_renders(opened_report):
    browser, tmp = opened_report
    assert browser.save_screenshot(str(tmp / "report_top.png"))
    headings = browser.execute_script("return [...document.querySelectorAll('h2')].map(h => h.textContent)")
    expected = (["Settings", "Data overview", "Model summary", "Training curves", "Test metrics"]
                + [s.title for s in registry.STAGES if s.run_all and s.when_set is None and s.name != "report"]
                + ["Stage timings", "Provenance"])
    assert [h for h in headings if h in expected] == expected
    figures = browser.execute_script("return [...document.querySelectorAll('figure img')]"
                                     ".map(i => [i.alt, i.complete && i.naturalWidth > 0])")
    assert len(figures) >= 15 and all(loaded for _, loaded in figures), [n for n, ok in figures if not ok]
    names = {name for name, _ in figures}
    assert {"confusion_matrix.png", "training_plot.png", "umap_embeddings.png", "accuracy_all.png"} <= names
    canvases = browser.execute_script(FIND_ALL + "return all(document, 'canvas').map(c => [c.width, c.height])")
    assert any(w > 300 and h > 300 for w, h in canvases), canvases  # the UMAP plot drew


def test_hovering_and_clicking_a_point_shows_its_thumbnail(opened_report):
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    browser, tmp = opened_report
    x, y, thumb = browser.execute_script(POINT)
    assert thumb.startswith("data:image/")
    hover = ActionBuilder(browser)
    hover.pointer_action.move_to_location(int(x), int(y))
    hover.perform()
    time.sleep(1)
    browser.save_screenshot(str(tmp / "report_hover.png"))
    shown = browser.execute_script(FIND_ALL + "return all(document, 'img').filter(i => i.getRootNode() !== document)"
                                              ".map(i => [i.src, i.naturalWidth, i.offsetWidth])")
    assert any(src == thumb and natural > 0 and width > 0 for src, natural, width in shown), len(shown)
    click = ActionBuilder(browser)
    click.pointer_action.move_to_location(int(x), int(y))
    click.pointer_action.click()
    click.perform()
    time.sleep(1)
    panel = browser.execute_script("const img = document.querySelector('#umap-tapped img');"
                                   "return img && [img.src, img.naturalWidth]")
    assert panel and panel[1] > 0 and panel[0].startswith("data:image/")
