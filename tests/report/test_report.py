"""modelpress report over real inputs made on a tiny Llama (compress, eval with tasks/slices/behaviour
against the float model, bench, a 3-trial search): the HTML is self-contained, holds every section,
and its tables print the inputs' numbers; bad inputs are refused by name."""
from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("optuna")

from modelpress.cli.main import main  # noqa: E402
from modelpress.core.errors import ModelpressError  # noqa: E402
from modelpress.report.inputs import read_inputs  # noqa: E402
from modelpress.eval.layer_stats import layer_bits, layer_sparsity, mean_final_bits  # noqa: E402
from modelpress.search.pareto import nondominated  # noqa: E402
from tests.conftest import TEXT  # noqa: E402

PRICE = 2.5
SPACE = """
params:
  bits: {choices: [2, 4, 8]}
  sparsity: {choices: [0.0, 0.5]}
stages:
  - {method: magnitude, when: sparsity, ignore: [lm_head], pattern: unstructured, sparsity: $sparsity}
  - {method: rtn, ignore: [lm_head], format: {type: int, bits: $bits, granularity: 32}}
"""


def run(*argv: object) -> int:
    return main(["--quiet", *map(str, argv)])


@pytest.fixture(scope="module")
def inputs(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("report-inputs")
    sents = [s.strip() for s in TEXT[:400].split(".") if s.strip()]
    rows = []
    for i, s in enumerate(sents * 3):
        words, other = s.split(), sents[(i + 1) % len(sents)].split()[:3]
        cut = max(2, len(words) // 2)
        rows.append({"context": " ".join(words[:cut]), "choices": [" ".join(words[cut:]), " ".join(other)],
                     "label": i % 2, "slice": f"s{i % 3}"})
    (d / "story.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "suite.yaml").write_text("- {id: tale, prompt: Once upon a time, max_new_tokens: 5, expect: {min_chars: 1}}\n"
                                  "- {id: robot, prompt: The robot, max_new_tokens: 5, expect: {contains: [zebra]}}\n")
    common = ["--task", d / "story.jsonl", "--behaviour", d / "suite.yaml", "--data", tiny_text_file, "--seq-len", "64",
              "--max-tokens", "256"]
    files: dict[str, Path] = {}
    assert run("eval", "--model", tiny_llama_dir, *common, "--json", d / "fp32.json") == 0
    files["fp32"] = d / "fp32.json"
    for recipe in ("rtn-w8", "rtn-w4-g32"):
        assert run("compress", "--model", tiny_llama_dir, "--recipe", recipe, "--output", d / recipe) == 0
        assert run("eval", "--model", d / recipe, "--baseline", tiny_llama_dir, *common, "--json", d / f"{recipe}.json") == 0
        files[recipe] = d / f"{recipe}.json"
    for label, model in (("fp32", tiny_llama_dir), ("rtn-w4-g32", d / "rtn-w4-g32")):
        assert run("bench", "--model", model, "--same-process", "--threads", "1", "--batches", "1", "--prompt-len", "8",
                   "--new-tokens", "4", "--bandwidth-mib", "8", "--dtype", "float32", "--json", d / f"{label}.bench.json") == 0
    (d / "space.yaml").write_text(SPACE)
    assert run("search", "--model", tiny_llama_dir, "--space", d / "space.yaml", "--trials", "3", "--storage",
               f"sqlite:///{d / 's.db'}", "--study", "tiny", "--out", d / "search", "--eval-data", tiny_text_file,
               "--eval-max-tokens", "256", "--eval-seq-len", "64", "--latency-prompt", "8", "--latency-tokens", "4",
               "--seed", "0") == 0
    return files | {"dir": d}


def _report_args(i: dict[str, Path]) -> list[object]:
    d = i["dir"]
    return ["report", "--inputs", f"fp32={i['fp32']}", f"fp32={d / 'fp32.bench.json'}", f"w8={i['rtn-w8']}",
            f"w8={d / 'rtn-w8'}", f"w4={i['rtn-w4-g32']}", f"w4={d / 'rtn-w4-g32' / 'report.json'}",
            f"w4={d / 'rtn-w4-g32.bench.json'}", d / "search", "--baseline", "fp32", "--price-per-hour", PRICE]


class _Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts, and every src/href attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.links: list[str] = []
        self.tags: set[str] = set()
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)
        self.links += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _table(page: _Tables, first_header: str, must: str) -> list[dict[str, str]]:
    for t in page.tables:
        if t and t[0] and t[0][0] == first_header and any(must in h for h in t[0]):
            return [dict(zip(t[0], r)) for r in t[1:]]
    raise AssertionError(f"no table with {first_header!r} / {must!r}")


@pytest.fixture(scope="module")
def page(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[str, _Tables, Path]:
    out = tmp_path_factory.mktemp("report")
    assert run(*_report_args(inputs), "--html", out / "r.html", "--markdown", out / "r.md") == 0
    text = (out / "r.html").read_text()
    p = _Tables()
    p.feed(text)
    return text, p, out


def test_html_is_self_contained(page: tuple[str, _Tables, Path]) -> None:
    text, p, _ = page
    assert p.links and all(link.startswith("data:image/png;base64,") for link in p.links)
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:|//)", text, re.I)
    assert not p.tags & {"script", "link", "iframe", "object"}
    for link in p.links:
        assert base64.b64decode(link.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_section_is_there(page: tuple[str, _Tables, Path]) -> None:
    text, p, _ = page
    for title in ("Summary", "Quality vs size: Pareto front", "Per-layer bits and sparsity", "Per-slice deltas",
                  "Capability elasticity", "Behavioural changes", "Latency, memory and cost per token", "Search: tiny"):
        assert f"<h2>{title}</h2>" in text, title
    alts = re.findall(r'<img alt="([^"]+)"', text)
    assert set(alts) == {"pareto", "layers", "slices", "elasticity", "perf"}


def test_summary_and_perf_numbers_are_the_inputs(inputs: dict[str, Path], page: tuple[str, _Tables, Path]) -> None:
    _, p, _ = page
    rows = {r["model"]: r for r in _table(p, "model", "perplexity")}
    assert list(rows) == ["fp32", "w8", "w4"]
    fp32 = json.loads(inputs["fp32"].read_text())
    for label, key in (("fp32", "fp32"), ("w8", "rtn-w8"), ("w4", "rtn-w4-g32")):
        ev = json.loads(inputs[key].read_text())
        r = rows[label]
        assert r["perplexity"] == f"{ev['perplexity']:.3f}"
        assert r["size MiB"] == f"{ev['size_bytes'] / 2**20:.1f}"
        assert r["x smaller"] == f"{fp32['size_bytes'] / ev['size_bytes']:.2f}"
        assert r["story acc_norm"] == f"{ev['tasks']['story']['acc_norm']:.4f}"
        if label != "fp32":
            assert r["story flips"] == f"{ev['tasks']['story']['flips_norm']['flip_rate']:.4f}"
            assert r["KL nats"] == f"{ev['agreement']['kl']:.4f}"
            assert r["ΔPPL %"] == f"{100 * (ev['perplexity'] - fp32['perplexity']) / fp32['perplexity']:+.1f}"
    w4 = json.loads((inputs["dir"] / "rtn-w4-g32" / "report.json").read_text())
    assert rows["w4"]["bits/weight"] == f"{w4['mean_bits_per_weight']:.2f}"
    perf = {r["model"]: r for r in _table(p, "model", "decode ms/token")}
    for label, f in (("fp32", "fp32.bench.json"), ("w4", "rtn-w4-g32.bench.json")):
        b = json.loads((inputs["dir"] / f).read_text())
        tps = b["decode_tokens_per_s"]
        assert perf[label]["decode tok/s"] == f"{tps:.1f}" == rows[label]["decode tok/s"]
        assert perf[label][f"cost per 1M tokens (at {PRICE}/h)"] == f"{PRICE / (3600 * tps) * 1e6:.4f}"
        assert perf[label]["peak RSS MiB"] == f"{b['peak_rss_bytes'] / 2**20:.0f}"


def test_slice_and_behaviour_tables_are_the_inputs(inputs: dict[str, Path], page: tuple[str, _Tables, Path]) -> None:
    _, p, _ = page
    rows = _table(p, "task", "slice")
    w4 = json.loads(inputs["rtn-w4-g32"].read_text())["tasks"]["story"]["slices"]["data"]["acc_norm"]
    by_slice = {r["slice"]: r for r in rows if r["slicing"] == "data"}
    assert set(by_slice) == {"(all)", "s0", "s1", "s2"}
    for s, r in w4["slices"].items():
        assert by_slice[s]["w4 (Δ)"] == f"{r['value']:.3f} ({r['delta']:+.3f})"
    assert by_slice["(all)"]["w4 (Δ)"] == f"{w4['overall']['value']:.3f} ({w4['overall']['delta']:+.3f})"
    beh = {r["prompt"]: r for r in _table(p, "prompt", "fp32") if "pass" in r["fp32"] or "FAIL" in r["fp32"]}
    ev = json.loads(inputs["rtn-w8"].read_text())["behaviour"]["prompts"]
    for prompt in ev:
        cell = beh[prompt["id"]]["w8"]
        assert cell.startswith("pass" if prompt["passed"] else "FAIL")
        assert ("same output" in cell) == prompt["same_output"]
    assert beh["robot"]["fp32"].startswith("FAIL contains")  # no zebra in a robot story


def test_search_front_is_the_search_result(inputs: dict[str, Path], page: tuple[str, _Tables, Path]) -> None:
    _, p, _ = page
    res = json.loads((inputs["dir"] / "search" / "search.json").read_text())
    rows = _table(p, "trial", "perplexity")
    assert sorted(int(r["trial"]) for r in rows) == sorted(res["pareto"])
    for r in rows:
        t = next(t for t in res["trials"] if t["number"] == int(r["trial"]))
        assert r["perplexity"] == f"{t['objectives']['perplexity']:.3f}"
        assert r["bits"] == str(t["params"]["bits"])


def test_markdown_has_the_tables_and_its_figures(page: tuple[str, _Tables, Path]) -> None:
    text, _, out = page
    md = (out / "r.md").read_text()
    for title in ("## Summary", "## Per-slice deltas", "## Capability elasticity", "## Behavioural changes"):
        assert title in md
    figs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(figs) == 5 and all((out / f).is_file() for f in figs)
    ppl_cells = re.findall(r"<td>(\d+\.\d{3})</td>", text)
    assert all(c in md for c in ppl_cells)  # the same numbers in both


def test_one_model_has_no_elasticity_curve(inputs: dict[str, Path], tmp_path: Path) -> None:
    assert run("report", "--inputs", inputs["rtn-w8"], "--html", tmp_path / "one.html") == 0
    text = (tmp_path / "one.html").read_text()
    assert "<h2>Summary</h2>" in text and "<h2>Capability elasticity</h2>" not in text and "<h2>Search" not in text


@pytest.mark.parametrize("content,needle", [
    ("not json", "not a JSON file"),
    ('{"hello": 1}', "not an eval JSON, compress report, bench JSON or search result"),
])
def test_bad_inputs_are_named(content: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert run("report", "--inputs", bad, "--html", tmp_path / "x.html") == 2
    err = capsys.readouterr().err
    assert needle in err and str(bad) in err
    assert run("report", "--inputs", tmp_path / "missing.json", "--html", tmp_path / "x.html") == 2
    assert "missing.json does not exist" in capsys.readouterr().err


def test_two_evals_for_one_label_are_refused(inputs: dict[str, Path]) -> None:
    with pytest.raises(ModelpressError, match="two eval inputs for 'x'"):
        read_inputs([f"x={inputs['fp32']}", f"x={inputs['rtn-w8']}"])


def test_unknown_baseline_label_is_refused(inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run("report", "--inputs", inputs["fp32"], "--baseline", "nope", "--html", tmp_path / "x.html") == 2
    assert "--baseline 'nope'" in capsys.readouterr().err


def test_layer_bits_and_sparsity_from_records() -> None:
    recs = [{"name": "l", "method": "magnitude", "fmt": {"pattern": {"type": "unstructured"}, "sparsity": 0.5},
             "bits_per_weight": 17.0},
            {"name": "l", "method": "rtn", "fmt": {"type": "int", "bits": 4, "granularity": {"kind": "group", "size": 32}},
             "bits_per_weight": 4.5}]
    assert layer_bits(recs) == 4.5 and layer_sparsity(recs) == 0.5
    assert mean_final_bits(recs + [{"name": "m", "fmt": {"bits": 8}, "bits_per_weight": 8.5}]) == 6.5
    assert layer_sparsity([{"fmt": {"pattern": {"type": "nm", "n": 2, "m": 4}}}]) == 0.5
    assert layer_sparsity(recs[1:]) == 0.0


def test_nondominated_is_the_brute_force_front() -> None:
    import random

    rng = random.Random(0)
    for _ in range(200):
        pts = [tuple(rng.choice([1.0, 2.0, 3.0]) for _ in range(rng.choice([2, 3]))) for _ in range(rng.randint(1, 12))]
        pts = [p[: len(pts[0])] + (1.0,) * (len(pts[0]) - len(p)) for p in pts]
        brute = [i for i, p in enumerate(pts)
                 if not any(all(a <= b for a, b in zip(q, p)) and q != p for q in pts)]
        assert nondominated(pts) == brute
