"""The dashboard in a real browser: Debian's headless Chromium, driven by
Selenium through Debian's chromedriver (`.ci/run` installs both), against a
live `banyan server` with workers and tasks made over HTTP. The numbers on
the page must equal the API's; a screenshot lands in `test-output/`.

Without Chromium these tests fail (they are never skipped): install the
Debian packages `chromium` and `chromium-driver`.
"""

import json
import os
import shutil
import time

import pytest

CHROMIUM = os.environ.get("BANYAN_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("BANYAN_CHROMEDRIVER", "/usr/bin/chromedriver")
OUTPUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-output")
STATES = ("inactive", "available", "running", "pending_cancellation", "cancelled", "terminated")
GiB = 1024**3


@pytest.fixture
def browser(tmp_path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(
            "headless Chromium is needed and %s is missing: "
            "apt-get install chromium chromium-driver (.ci/run does)" % ", ".join(missing)
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1700",
        "--user-data-dir=%s" % (tmp_path / "chromium-profile"),
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def open_dashboard(browser, url, query="refresh=1"):
    """Load the page; sign in through its form with the suite's token when
    the servers want one (on MongoDB)."""
    from conftest import TEST_TOKEN

    browser.get(url + "/dashboard?" + query)
    if TEST_TOKEN:
        wait_for(lambda: browser.find_element("id", "signin").is_displayed(), what="the sign-in form")
        sign_in(browser, TEST_TOKEN)
    # the actions a token may take are enabled once the server said whose it is
    wait_for(lambda: browser.find_element("id", "signed-in").get_attribute("data-role"), what="the caller")


def wait_for(predicate, timeout=20, what="the condition"):
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except StaleElementReferenceException:
            value = None  # the live page drew that element again meanwhile: look again
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting for %s" % what)


def refreshes(driver):
    return int(driver.execute_script("return document.body.dataset.refreshes || 0"))


def wait_refreshed(driver, after=0):
    """Wait until the page has completed a refresh that started after now."""
    wait_for(lambda: refreshes(driver) >= after + 2, what="the dashboard to refresh")


def text(driver, element_id):
    return driver.find_element("id", element_id).text


def populate(url, http, auth=None):
    """Two workers, tasks in every state but pending_cancellation, finished
    attempts with output. Returns (workers, task ids by name)."""
    headers = {"Authorization": "Bearer " + auth} if auth else {}

    def post(path, body, status=(200, 201)):
        r = http.post(url + path, json=body, headers=headers)
        assert r.status_code in status, r.text
        return r.json()

    workers = [
        post("/workers", {"host": host, "resources": {"cores": cores, "memory": memory, "gpus": gpus}})
        for host, cores, memory, gpus in (("node-a", 8, 16 * GiB, 1), ("node-b", 4, 8 * GiB, 0))
    ]
    tasks = post(
        "/tasks",
        [
            {
                "name": "quick-%d" % i,
                "command": "echo %d" % i,
                "state": "available",
                "requested_resources": {"cores": 1, "memory": "512 MiB"},
            }
            for i in range(4)
        ]
        + [
            {
                "name": "big",
                "command": "sleep 600",
                "state": "available",
                "priority": 10,
                "requested_resources": {"cores": 3, "memory": "2 GiB", "gpus": 1},
            },
            {"name": "later", "command": "true"},
            {"name": "waiting", "command": "true"},
            {"name": "dropped", "command": "true", "state": "available"},
        ],
    )
    ids = {
        name: item["_id"]
        for name, item in zip(
            ["quick-0", "quick-1", "quick-2", "quick-3", "big", "later", "waiting", "dropped"], tasks["_items"]
        )
    }
    r = http.patch(url + "/tasks/" + ids["dropped"], json={"state": "cancelled"}, headers=headers)
    assert r.status_code == 200, r.text

    # node-a takes the big task and a quick one; node-b takes two quick ones.
    a, b = workers[0]["_id"], workers[1]["_id"]
    claimed_a = post("/workers/%s/claim" % a, {"free": {"cores": 4, "memory": 4 * GiB, "gpus": 1}, "max_tasks": 2})
    claimed_b = post("/workers/%s/claim" % b, {"free": {"cores": 2, "memory": 4 * GiB, "gpus": 0}, "max_tasks": 2})
    names_a = [t["name"] for t in claimed_a["_items"]]
    assert names_a[0] == "big" and names_a[1].startswith("quick-"), names_a
    assert len(claimed_b["_items"]) == 2
    time.sleep(0.3)  # runtimes well above zero
    ids["ok"], ids["failed"] = claimed_a["_items"][1]["_id"], claimed_b["_items"][0]["_id"]
    post(
        "/tasks/%s/finish" % ids["ok"],
        {"attempt": 1, "outcome": "success", "exit_code": 0, "stdout": "hello from a quick task\n", "stderr": ""},
    )
    post(
        "/tasks/%s/finish" % ids["failed"],
        {"attempt": 1, "outcome": "failure", "exit_code": 3, "stdout": "", "stderr": "boom\n"},
    )
    return workers, ids


#: Everything the page shows, read in one go (the page rebuilds its rows on
#: every refresh, so elements found one by one may go stale in between).
SNAPSHOT = """
const byId = (id) => document.getElementById(id);
const out = {text: {}, value: {}, workers: {}, tasks: [], bars: []};
for (const el of document.querySelectorAll("[id]")) {
  out.text[el.id] = el.textContent.trim();
  if (el.dataset.value !== undefined) out.value[el.id] = el.dataset.value;
}
for (const row of document.querySelectorAll("#workers-body tr[id]")) {
  const cells = {};
  for (const td of row.querySelectorAll("td[class]")) {
    const key = [...td.classList].find((c) => c.startsWith("w-"));
    if (key) cells[key] = {text: td.textContent.trim(), used: td.dataset.used, total: td.dataset.total};
  }
  out.workers[row.id] = cells;
}
for (const row of document.querySelectorAll("#tasks-body tr[id]")) {
  out.tasks.push([row.id, row.querySelector(".t-state").textContent.trim()]);
}
for (const bar of document.querySelectorAll("#throughput-chart rect.b")) out.bars.push(Number(bar.dataset.finished));
return out;
"""


def number(raw):
    return None if raw in ("", None) else float(raw)


def compare_with_api(driver, url, http, headers=None):
    """Every figure the page shows equals the API's."""
    stats = http.get(url + "/stats", headers=headers).json()
    load = http.get(url + "/stats/workers", headers=headers).json()
    recent = http.get(url + "/tasks", params={"sort": "-_updated", "max_results": 25}, headers=headers).json()
    page = driver.execute_script(SNAPSHOT)
    text, value = page["text"], page["value"]
    assert int(text["count-total"]) == stats["total"]
    for state in STATES:
        assert int(text["count-" + state]) == stats["states"][state], state
        assert int(value["count-" + state]) == stats["states"][state], state
    assert int(text["tasks-succeeded"]) == stats["succeeded"]
    assert int(text["tasks-failed"]) == stats["failed"]
    for prefix, figures in (("runtime", stats["attempts"]["runtime"]), ("wait", stats["queue_wait"])):
        assert int(text[prefix + "-count"]) == figures["count"]
        for key in ("mean", "median", "p95", "max"):
            assert number(value["%s-%s" % (prefix, key)]) == pytest.approx(figures[key]), (prefix, key)
    assert int(text["throughput-finished"]) == stats["throughput"]["finished"]
    assert int(text["throughput-succeeded"]) == stats["throughput"]["succeeded"]
    assert page["bars"] == [m["finished"] for m in stats["throughput"]["per_minute"]]

    assert int(text["workers-active"]) == load["summary"]["states"]["active"]
    assert int(text["workers-running"]) == load["summary"]["running"]
    assert text["workers-cores"] == "%d / %d" % (load["summary"]["cores"]["used"], load["summary"]["cores"]["total"])
    assert sorted(page["workers"]) == sorted("worker-" + w["_id"] for w in load["_items"])
    for worker in load["_items"]:
        row = page["workers"]["worker-" + worker["_id"]]
        assert row["w-host"]["text"] == worker["host"]
        assert row["w-state"]["text"] == worker["state"]
        assert int(row["w-running"]["text"]) == worker["running"]
        for key in ("cores", "memory", "gpus"):
            assert float(row["w-" + key]["used"]) == worker["used"][key], key
            assert float(row["w-" + key]["total"]) == worker["resources"][key], key

    assert page["tasks"] == [["task-" + t["_id"], t["state"]] for t in recent["_items"]]
    return stats, load


@pytest.mark.slow
def test_dashboard_shows_the_api_numbers(live_server, http, browser):
    url = live_server.url
    workers, ids = populate(url, http)
    open_dashboard(browser, url)
    wait_refreshed(browser, refreshes(browser))
    assert browser.find_element("id", "error").is_displayed() is False
    stats, load = compare_with_api(browser, url, http)
    # What the test made, as the API reports it.
    assert stats["states"] == {
        "inactive": 2,
        "available": 1,
        "running": 2,
        "pending_cancellation": 0,
        "cancelled": 1,
        "terminated": 2,
    }
    assert stats["attempts"]["count"] == 2 and stats["attempts"]["runtime"]["median"] >= 0.3
    assert (stats["succeeded"], stats["failed"], stats["throughput"]["finished"]) == (1, 1, 2)
    assert load["summary"]["cores"] == {"used": 4, "total": 12}
    assert load["summary"]["running"] == 2

    # One task's attempts and output.
    browser.find_element("id", "task-" + ids["ok"]).click()
    wait_for(
        lambda: "hello from a quick task" in browser.find_element("id", "task-logs").text, what="the task's output"
    )
    attempts = browser.find_elements("css selector", "#attempts-body tr")
    assert len(attempts) == 1 and "success" in attempts[0].text and "node-a" in attempts[0].text
    assert text(browser, "log-stdout") == "hello from a quick task"
    assert ids["ok"] in text(browser, "task-title")

    # It refreshes itself: a change shows up without reloading.
    r = http.patch(url + "/tasks/" + ids["later"], json={"state": "available"})
    assert r.status_code == 200
    wait_for(
        lambda: text(browser, "count-available") == str(stats["states"]["available"] + 1),
        what="the new available task on the page",
    )
    wait_refreshed(browser, refreshes(browser))
    compare_with_api(browser, url, http)

    os.makedirs(OUTPUT, exist_ok=True)
    path = os.path.join(OUTPUT, "dashboard.png")
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(path)
    assert os.path.getsize(path) > 10000


@pytest.fixture
def auth_server(tmp_path):
    from conftest import LiveServer

    server = LiveServer(tmp_path / "auth-server-data", extra_args=["--auth"]).start()
    yield server
    server.stop()
    assert server.server_errors() == []


@pytest.mark.slow
def test_dashboard_honours_authentication(auth_server, http, browser):
    url = auth_server.url
    with open(os.path.join(auth_server.data_dir, "admin.token")) as f:
        admin = f.read().strip()
    as_admin = {"Authorization": "Bearer " + admin}

    def token(role, name):
        r = http.post(url + "/tokens", json={"role": role, "name": name}, headers=as_admin)
        assert r.status_code == 201, r.text
        return r.json()["token"]

    worker, alice, bob = token("worker", "w1"), token("user", "alice"), token("user", "bob")
    r = http.post(
        url + "/workers",
        json={"host": "node-a", "resources": {"cores": 4, "memory": GiB, "gpus": 0}},
        headers={"Authorization": "Bearer " + worker},
    )
    assert r.status_code == 201, r.text
    for user, count in ((alice, 2), (bob, 3)):
        r = http.post(
            url + "/tasks",
            json=[{"command": "true", "state": "available"}] * count,
            headers={"Authorization": "Bearer " + user},
        )
        assert r.status_code == 201, r.text

    # Without a token the page loads but shows no data, only how to sign in.
    browser.get(url + "/dashboard?refresh=1")
    wait_for(lambda: browser.find_element("id", "error").is_displayed(), what="the sign-in message")
    assert "requires a token" in text(browser, "error")
    assert browser.find_element("id", "signin").is_displayed()
    assert text(browser, "count-total") == "–"

    # A token in the address is refused, said why, and dropped from the address bar.
    browser.get(url + "/dashboard?refresh=1&token=" + alice)
    wait_for(lambda: "refused" in text(browser, "error"), what="the refusal of ?token=")
    assert "history" in text(browser, "error")
    assert "token=" not in browser.current_url
    assert browser.execute_script("return sessionStorage.length") == 0
    assert text(browser, "count-total") == "–"

    # Signed in through the form, the page shows what that user may see.
    sign_in(browser, alice)
    wait_for(lambda: text(browser, "count-total") == "2", what="alice's tasks")
    wait_refreshed(browser, refreshes(browser))
    as_alice = {"Authorization": "Bearer " + alice}
    stats, _ = compare_with_api(browser, url, http, headers=as_alice)
    assert stats["total"] == 2 and text(browser, "count-available") == "2"
    assert browser.find_element("id", "error").is_displayed() is False
    assert "alice" in text(browser, "signed-in")
    assert len(browser.find_elements("css selector", "#workers-body tr")) == 1

    # She acts on her own tasks, all she is shown: hold both, one result per task.
    mine = [t["_id"] for t in http.get(url + "/tasks", headers=as_alice).json()["_items"]]
    as_bob = {"Authorization": "Bearer " + bob}
    bobs = [t["_id"] for t in http.get(url + "/tasks", headers=as_bob).json()["_items"]]
    browser.find_element("id", "select-all").click()
    assert text(browser, "selected-count") == "2"
    browser.find_element("id", "act-hold").click()
    wait_for(lambda: len(browser.find_elements("css selector", "#action-results tr")) == 2, what="the results")
    results = browser.execute_script(
        "return [...document.querySelectorAll('#action-results tr')].map((r) => [r.id, r.dataset.status])"
    )
    assert sorted(results) == sorted(["result-" + i, "OK"] for i in mine)
    assert all(http.get(url + "/tasks/" + i, headers=as_alice).json()["held"] for i in mine)
    assert not any(http.get(url + "/tasks/" + i, headers=as_bob).json()["held"] for i in bobs)
    wait_for(
        lambda: len(browser.find_elements("css selector", "#tasks-body .t-reason[data-code=held]")) == 2,
        what="the held reason on her tasks",
    )
    # Bob's tasks are not found, even by their id.
    field = browser.find_element("id", "filter-text")
    field.send_keys(bobs[0])
    browser.find_element("id", "filter-apply").click()
    wait_for(lambda: text(browser, "tasks-total") == "0", what="no task of bob's")
    screenshot(browser, "dashboard-user.png")

    # Signing out forgets the token and shows the form again.
    browser.find_element("id", "signout-button").click()
    wait_for(lambda: browser.find_element("id", "signin").is_displayed(), what="the sign-in form again")
    assert browser.execute_script("return sessionStorage.length") == 0
    assert text(browser, "count-total") == "–"


def sign_in(browser, token):
    field = browser.find_element("id", "token-input")
    field.clear()
    field.send_keys(token)
    browser.find_element("id", "signin-button").click()
    wait_for(lambda: browser.find_element("id", "signed-in").get_attribute("data-role"), what="the sign-in")
    assert "token" not in browser.current_url


def screenshot(browser, name):
    os.makedirs(OUTPUT, exist_ok=True)
    path = os.path.join(OUTPUT, name)
    assert browser.save_screenshot(path)
    return path


# -- working from the page, against real workers -------------------------
# `?refresh=3600`: the page's periodic re-read never comes in these tests, so
# whatever it shows after an action came through the live feed (GET /changes).


def row_state(browser, task_id):
    return browser.execute_script(
        "const r = document.getElementById('task-' + arguments[0]); return r ? r.dataset.state : null", task_id
    )


def not_reloaded(browser):
    return browser.execute_script("return window.__banyan_test_marker === 1")


@pytest.mark.slow
def test_cancel_a_running_task_from_the_page(tmp_path, browser):
    from test_worker_live import Cluster, gone

    c = Cluster(tmp_path / "cluster")
    try:
        c.start_worker("alpha", "--cores", "1")
        c.worker_ids(["alpha"])
        pid_file = tmp_path / "pid"
        task_id = c.submit(
            {"name": "sleeper", "command": "echo $$ > %s; exec sleep 300" % pid_file, "state": "available"}
        )
        pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 30, "the task to start"))
        open_dashboard(browser, c.url, "refresh=3600")
        wait_for(lambda: row_state(browser, task_id) == "running", what="the running task on the page")
        browser.execute_script("window.__banyan_test_marker = 1")

        browser.find_element("css selector", "#task-%s .t-select" % task_id).click()
        browser.find_element("id", "act-cancel").click()
        wait_for(lambda: browser.find_element("id", "confirm").is_displayed(), what="the confirmation")
        assert "Cancel 1 task" in text(browser, "confirm-text")
        browser.find_element("id", "confirm-yes").click()
        clicked = time.monotonic()
        wait_for(lambda: row_state(browser, task_id) == "cancelled", what="cancelled on the page")
        shown_after = time.monotonic() - clicked
        assert not_reloaded(browser)
        assert c.task(task_id)["state"] == "cancelled"
        wait_for(lambda: gone(pid), 10, "the task's process to be gone")
        assert browser.find_element("id", "result-" + task_id).get_attribute("data-status") == "OK"
        screenshot(browser, "dashboard-cancel.png")
        print("cancelled shown on the page %.2f s after the confirmation click" % shown_after)
        with open(os.path.join(OUTPUT, "dashboard-cancel.txt"), "w") as f:
            f.write("cancelled shown %.2f s after the click\n" % shown_after)
    finally:
        c.close()
    assert c.server.server_errors() == []


@pytest.mark.slow
def test_retry_a_failed_job_from_the_page_and_follow_it_to_success(tmp_path, browser):
    from test_worker_live import Cluster

    c = Cluster(tmp_path / "cluster")
    try:
        c.start_worker("alpha", "--cores", "2")
        r = c.http.post(c.url + "/jobs", json={"name": "flaky"})
        assert r.status_code == 201, r.text
        job = r.json()["_id"]
        # Each task fails the first time (it leaves a marker) and succeeds the next.
        ids = c.submit(
            [
                {
                    "name": "flaky",
                    "job": job,
                    "state": "available",
                    "environment": {"BANYAN_ARRAY_INDEX": str(i)},
                    "command": "test -e %s/m%d || { touch %s/m%d; exit 3; }" % (tmp_path, i, tmp_path, i),
                }
                for i in range(3)
            ]
        )
        docs = c.wait_finished(ids)
        assert [d["exit_status"] for d in docs] == ["failure"] * 3

        open_dashboard(browser, c.url, "refresh=3600")
        wait_for(lambda: browser.find_elements("id", "job-" + job), what="the job on the page")
        browser.find_element("css selector", "#job-%s .j-name" % job).click()
        wait_for(
            lambda: text(browser, "tasks-title") == "Tasks of job flaky" and text(browser, "tasks-total") == "3",
            what="the job's tasks",
        )
        assert all(row_state(browser, i) == "terminated" for i in ids)
        indices = browser.execute_script(
            "return [...document.querySelectorAll('#tasks-body .t-index')].map((td) => td.textContent)"
        )
        assert sorted(indices) == ["0", "1", "2"]
        browser.execute_script("window.__banyan_test_marker = 1")
        browser.find_element("id", "job-retry").click()
        wait_for(
            lambda: len(browser.find_elements("css selector", "#action-results tr[data-status=OK]")) == 3,
            what="three retries accepted",
        )

        def succeeded():
            return browser.execute_script(
                "return [...document.querySelectorAll('#tasks-body tr[id]')].map((r) => "
                "[r.dataset.state, r.querySelector('.t-exit').textContent])"
            )

        wait_for(
            lambda: succeeded() == [["terminated", "success"]] * 3,
            timeout=40,
            what="the page to follow the job to success",
        )
        assert not_reloaded(browser)
        wait_for(
            lambda: browser.find_element("css selector", "#job-%s .j-status" % job).text == "succeeded",
            what="the job succeeded on the page",
        )
        assert [d["exit_status"] for d in c.wait_finished(ids)] == ["success"] * 3
        screenshot(browser, "dashboard-retry.png")
    finally:
        c.close()
    assert c.server.server_errors() == []


@pytest.mark.slow
def test_filter_a_two_thousand_task_job_and_page_through_it(live_server, http, browser):
    from conftest import MONGO_URI

    # FerretDB on this suite's machines inserts about 20 tasks a second: a
    # smaller job there still spans several pages of the filtered view.
    count = 400 if MONGO_URI else 2000
    url = live_server.url
    r = http.post(url + "/jobs", json={"name": "sweep"})
    assert r.status_code == 201, r.text
    job = r.json()["_id"]
    names = ("even", "odd")
    r = http.post(
        url + "/tasks",
        json=[
            {
                "name": names[i % 2],
                "job": job,
                "command": ["sh", "-c", "echo $BANYAN_ARRAY_INDEX"],
                "environment": {"BANYAN_ARRAY_INDEX": str(i)},
                "state": "available" if i % 3 else "inactive",
            }
            for i in range(count)
        ],
    )
    assert r.status_code == 201, r.text

    open_dashboard(browser, url, "refresh=3600")
    wait_for(lambda: browser.find_elements("id", "job-" + job), what="the job on the page")
    browser.find_element("css selector", "#job-%s .j-name" % job).click()
    wait_for(lambda: text(browser, "tasks-total") == str(count), timeout=60, what="the job's tasks")
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "filter-state")).select_by_visible_text("available")
    browser.find_element("id", "filter-name").send_keys("even")
    browser.find_element("id", "filter-apply").click()

    where = {"$and": [{"job": job}, {"state": "available"}, {"name": "even"}]}
    api = http.get(url + "/tasks", params={"where": json.dumps(where), "max_results": 25, "sort": "_created"}).json()
    total = api["_meta"]["total"]
    assert total == len([i for i in range(count) if i % 2 == 0 and i % 3])
    wait_for(lambda: text(browser, "tasks-total") == str(total), timeout=60, what="the filtered count")
    stats = http.get(url + "/stats", params={"where": json.dumps(where)}).json()

    def counted(state):
        found = browser.find_elements("id", "fcount-" + state)
        return found and int(found[0].get_attribute("data-value"))

    wait_for(
        lambda: counted("available") == stats["states"]["available"] == total,
        timeout=60,
        what="the filtered count by state",
    )
    assert counted("inactive") == 0

    def rows():
        return browser.execute_script("return [...document.querySelectorAll('#tasks-body tr[id]')].map((r) => r.id)")

    assert rows() == ["task-" + t["_id"] for t in api["_items"]]
    pages = int(browser.find_element("id", "page-info").get_attribute("data-pages"))
    assert pages == -(-total // 25)
    # The list command is shown as a shell would quote it.
    assert browser.find_element("css selector", "#tasks-body .t-command").text == "sh -c 'echo $BANYAN_ARRAY_INDEX'"
    for page in (2, 3):
        browser.find_element("id", "page-next").click()
        wait_for(
            lambda: browser.find_element("id", "page-info").get_attribute("data-page") == str(page),
            timeout=60,
            what="page %d" % page,
        )
        api = http.get(
            url + "/tasks", params={"where": json.dumps(where), "max_results": 25, "sort": "_created", "page": page}
        ).json()
        wait_for(
            lambda: rows() == ["task-" + t["_id"] for t in api["_items"]], timeout=60, what="the rows of page %d" % page
        )
    screenshot(browser, "dashboard-filter.png")


@pytest.mark.slow
def test_a_jobs_graph_is_drawn_with_its_edges_in_layers(live_server, http, browser):
    url = live_server.url
    r = http.post(url + "/jobs", json={"name": "shapes"})
    assert r.status_code == 201, r.text
    job = r.json()["_id"]

    def add(name, after=()):
        r = http.post(url + "/tasks", json={"name": name, "job": job, "command": "true", "after": list(after)})
        assert r.status_code == 201, r.text
        return r.json()["_id"]

    # A diamond (top -> left, right -> bottom) and a fan-in (three -> sink).
    top = add("top")
    left, right = add("left", [top]), add("right", [top])
    bottom = add("bottom", [left, right])
    fans = [add("fan-%d" % i) for i in range(3)]
    sink = add("sink", fans)
    names = {
        top: "top",
        left: "left",
        right: "right",
        bottom: "bottom",
        sink: "sink",
        **{f: "fan-%d" % i for i, f in enumerate(fans)},
    }

    open_dashboard(browser, url, "refresh=3600")
    wait_for(lambda: browser.find_elements("id", "job-" + job), what="the job on the page")
    browser.find_element("css selector", "#job-%s .j-name" % job).click()
    graph = """return {
      edges: [...document.querySelectorAll('#graph path.edge')].map((e) => [e.dataset.from, e.dataset.to]),
      layers: Object.fromEntries([...document.querySelectorAll('#graph g.node')]
                                 .map((g) => [g.dataset.id, +g.dataset.layer]))}"""
    drawn = wait_for(
        lambda: (lambda g: g if len(g["layers"]) == 8 else None)(browser.execute_script(graph)), what="the job's graph"
    )
    edges = sorted((names[a], names[b]) for a, b in drawn["edges"])
    assert edges == sorted(
        [
            ("top", "left"),
            ("top", "right"),
            ("left", "bottom"),
            ("right", "bottom"),
            ("fan-0", "sink"),
            ("fan-1", "sink"),
            ("fan-2", "sink"),
        ]
    )
    layers = {names[i]: n for i, n in drawn["layers"].items()}
    assert layers == {"top": 0, "left": 1, "right": 1, "bottom": 2, "fan-0": 0, "fan-1": 0, "fan-2": 0, "sink": 1}
    browser.execute_script("document.getElementById('graph-section').scrollIntoView()")
    screenshot(browser, "dashboard-graph.png")
