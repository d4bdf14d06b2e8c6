"""`popkin.report`: one self-contained HTML file with every figure embedded; a slow test
renders it in headless Chromium and checks that every image decoded (naturalWidth > 0)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess

import pandas as pd
import pytest

from _builders import biomarker_data, synthetic_fit
from popkin import diagnostics as dg
from popkin.report import report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fit():
    return synthetic_fit(biomarker_data(40, seed=3))


@pytest.fixture(scope="module")
def html_path(fit, tmp_path_factory):
    import numpy as np

    t = np.linspace(0, 12, 13)
    extra = [
        ("Forecast", dg.forecast_band(t, 40 + t, 35 + t, 45 + t, dv_unit="U/L",
                                      time_unit="week", ylabel="biomarker")),
        ("A table", pd.DataFrame({"x": [1.5, 2.5], "name": ["a", "<b>"]})),
        ("Raw HTML", "<p id='raw-html'>as given</p>"),
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("report") / "report.html"
    return report(fit, path, extra_sections=extra, n_sim=200, dv_unit="U/L", time_unit="week")


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def test_report_embeds_every_figure(html_path):
    html = html_path.read_text(encoding="utf-8")
    imgs = _images(html)
    # GOF, individual fits, pcVPC, NPDE, eta pairs, and the extra forecast figure
    assert len(imgs) == 6 == html.count("<img")
    assert all(b.startswith(PNG) and len(b) > 5000 for b in imgs)
    for title in ("Model", "Data", "Estimates", "Goodness of fit", "Prediction-corrected VPC",
                  "NPDE", "Random effects", "Forecast", "A table", "Raw HTML"):  # fmt: skip
        assert f">{title}</h2>" in html, title
    assert "&lt;b&gt;" in html and "<p id='raw-html'>as given</p>" in html
    assert 'src="http' not in html and "<link" not in html  # self-contained


def test_report_rejects_bad_extra_sections_and_writes_nothing(fit, tmp_path):
    out = tmp_path / "r.html"
    with pytest.raises(TypeError, match="extra section 'bad'"):
        report(fit, out, extra_sections=[("bad", 42)], n_sim=200)
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(TypeError, match="needs a Fit"):
        report("fit.json", out)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
                       env=env, capture_output=True, timeout=900)  # fmt: skip
        exe = shutil.which("chromium")
    if not exe:
        pytest.skip("Debian `chromium` is not installed and cannot be installed here "
                    "(needs root and apt-get; run `make chromium`)")  # fmt: skip
    return exe


CHECK = """<script>
window.addEventListener('load', function () {
  var r = Array.prototype.map.call(document.images, function (i) {
    return i.complete && i.naturalWidth > 0 ? i.naturalWidth : 0; });
  var d = document.createElement('pre'); d.id = 'popkin-check';
  d.textContent = 'IMAGES ' + JSON.stringify(r); document.body.appendChild(d);
});
</script></body>"""


@pytest.mark.slow
def test_report_renders_in_headless_chromium(html_path, tmp_path):
    exe = _chromium()
    page = tmp_path / "page.html"
    page.write_text(html_path.read_text(encoding="utf-8").replace("</body>", CHECK),
                    encoding="utf-8")  # fmt: skip
    res = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    m = re.search(r"IMAGES (\[[0-9, ]*\])", res.stdout)
    assert m, f"no image report from chromium: {res.stderr[-2000:]}"
    widths = [int(w) for w in m.group(1).strip("[]").split(",") if w.strip()]
    assert len(widths) == 6 and all(w > 0 for w in widths), widths
