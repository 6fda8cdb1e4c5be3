"""The A/B preference page works in a real headless Chromium; win rates carry Wilson intervals."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from browser import browser
from easyref.bench.human import wilson_interval, win_rates, write_compare_page
from easyref.bench.manifest import BenchFormatError, Group, write_manifest
from easyref.bench.runs import open_run, write_group
from test_bench_manifest import bench_parser


@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, Path]:
    """Runs "red" and "blue" over three groups: every output is a solid image of the run's colour."""
    groups = []
    for g in range(3):
        paths = []
        for k in range(3):
            paths.append(tmp_path / f"g{g}-{k}.png")
            Image.new("RGB", (300, 200), (40 * k, 80, 60 * g)).save(paths[-1])
        groups.append(Group(f"g{g}", "held-out", "toys", tuple(paths[:2]), paths[2], f"toy <{g}> & friends"))
    manifest = write_manifest(groups, tmp_path / "bench.jsonl")
    runs = []
    for method, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        run = open_run(tmp_path / method, manifest, method, {})
        for group in groups:
            write_group(run, group, [Image.new("RGB", (64, 64), colour)], [{"method": method, "seed": 0}])
        runs.append(run)
    return runs[0], runs[1]


def _left_runs(page: Path) -> list[str]:
    data = json.loads(page.read_text().split('id="page-data">')[1].split("</script>")[0])
    return [group["order"]["left"] for group in data["groups"]]


def test_page_is_self_contained_seeded_and_escapes_captions(two_runs, tmp_path):
    page = write_compare_page(*two_runs, tmp_path / "page", seed=3)
    text = page.read_text()
    assert "toy &lt;1&gt; &amp; friends" in text
    assert "http" not in text  # nothing is fetched from a network
    sources = [chunk.split('"')[0] for chunk in text.split('src="')[1:]]
    assert len(sources) == 3 * 4 and all((page.parent / src).is_file() for src in sources)
    assert _left_runs(write_compare_page(*two_runs, tmp_path / "again", seed=3)) == _left_runs(page)
    lefts = {run for seed in range(6) for run in _left_runs(write_compare_page(*two_runs, tmp_path / "s", seed))}
    assert lefts == {"A", "B"}


def _downloaded(folder: Path, timeout: float = 10.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = list(folder.glob("*.json"))  # Chromium renames the file into place when complete
        if done:
            return done[0]
        time.sleep(0.1)
    raise AssertionError(f"no results file was downloaded into {folder}")


def test_a_real_click_is_recorded_as_the_run_shown_on_that_side(two_runs, tmp_path):
    page = write_compare_page(*two_runs, tmp_path / "page", seed=0)
    # Which run is really on the left of group 2: read the pixels, not the page's own mapping.
    left_colour = Image.open(page.parent / "images" / "2" / "left.png").getpixel((0, 0))
    left_run = "red" if left_colour[0] > left_colour[2] else "blue"
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = browser(downloads)
    try:
        driver.get(page.as_uri())
        assert driver.execute_script("return document.querySelectorAll('img.out').length") == 6
        assert driver.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
        driver.find_element("css selector", 'input[name="g2-consistency"][value="left"]').click()
        driver.find_element("css selector", 'input[name="g0-aesthetics"][value="tie"]').click()
        assert driver.find_element("id", "progress").text == "2 of 6 questions answered"
        driver.find_element("id", "download").click()
        shown = driver.find_element("id", "results").get_attribute("textContent")
        saved = json.loads(_downloaded(downloads).read_text())
    finally:
        driver.quit()
    assert json.loads(shown)["answers"] == saved["answers"]
    assert saved["page"]["seed"] == 0 and saved["page"]["runs"]["A"]["name"] == "red"
    by_group = {a["group_id"]: a for a in saved["answers"]}
    assert by_group["g2"] == {"group_id": "g2", "question": "consistency", "side": "left", "choice": left_run}
    assert by_group["g0"]["choice"] == "tie"


def _results(path: Path, choices: list[str], names=("red", "blue")) -> Path:
    answers = [{"group_id": f"g{k}", "question": "aesthetics", "choice": c} for k, c in enumerate(choices)]
    path.write_text(json.dumps({"page": {"runs": {"A": {"name": names[0]}, "B": {"name": names[1]}}},
                                "answers": answers}))
    return path


def test_win_rates_pool_files_and_report_ties_separately(tmp_path):
    files = [_results(tmp_path / "1.json", ["red"] * 5 + ["tie"]),
             _results(tmp_path / "2.json", ["red"] * 3 + ["blue"] * 1, names=("blue", "red"))]
    rates = win_rates(files)["questions"]
    assert list(rates) == ["aesthetics"]
    outcomes = rates["aesthetics"]["outcomes"]
    assert rates["aesthetics"]["answers"] == 10
    assert outcomes["red"]["count"] == 8 and outcomes["blue"]["count"] == 1 and outcomes["tie"]["count"] == 1
    assert sum(o["rate"] for o in outcomes.values()) == pytest.approx(1.0)
    # 8 of 10: the textbook Wilson 95% interval is 0.490 to 0.943.
    assert (outcomes["red"]["low"], outcomes["red"]["high"]) == pytest.approx((0.4902, 0.9433), abs=1e-4)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and 0.1 < high < 0.2


def test_results_for_other_runs_or_broken_files_are_refused(tmp_path):
    first = _results(tmp_path / "1.json", ["red"])
    with pytest.raises(BenchFormatError, match="not red with blue"):
        win_rates([first, _results(tmp_path / "2.json", ["green"], names=("green", "blue"))])
    (tmp_path / "3.json").write_text("{not json")
    with pytest.raises(BenchFormatError, match="not a results file"):
        win_rates([tmp_path / "3.json"])
    with pytest.raises(BenchFormatError, match="unknown run"):
        win_rates([_results(tmp_path / "4.json", ["purple"])])


def test_winrate_command_prints_a_table(tmp_path, capsys):
    args = bench_parser().parse_args(["bench", "winrate", str(_results(tmp_path / "1.json", ["red", "tie"]))])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "aesthetics" in out and "50% [9%, 91%]" in out
