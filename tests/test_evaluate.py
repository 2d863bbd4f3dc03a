"""The evaluation harness: Recall@K against a brute-force reference, headroom, and one run on the tiny store."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from typer.testing import CliRunner

from app.ml.retrieval import recall_at_k, same_caption_mask
from app.ml.store import routing_record
from offline import evaluate as ev
from offline import routing_ceiling as ceiling
from offline.config import TINY

# ------------------------------------------------------------------------------------------ Recall@K


def brute_force_recall(sim: list[list[float]], k: int) -> float:
    """% of rows whose match (column i of row i) is in the top k, sorting ties *against* the match."""
    hits = 0
    for i, row in enumerate(sim):
        # Sort by score, best first; among equal scores the non-matches come first (pessimistic).
        order = sorted(range(len(row)), key=lambda j: (-row[j], j == i))
        hits += order.index(i) < k
    return 100.0 * hits / len(sim)


HAND_MADE = [  # rows: images, columns: texts, matches on the diagonal
    [0.9, 0.1, 0.2, 0.0],  # clear hit
    [0.5, 0.5, 0.5, 0.5],  # constant row: every other text ties the match -> rank 3
    [0.3, 0.7, 0.7, 0.1],  # one tie above the match -> rank 1
    [0.2, 0.9, 0.8, 0.4],  # two strictly better -> rank 2
]


@pytest.mark.parametrize("sim", [HAND_MADE, torch.randint(0, 3, (9, 9), generator=torch.Generator().manual_seed(0))
                                 .float().tolist()], ids=["hand-made", "random-with-many-ties"])
def test_recall_at_k_matches_brute_force_with_pessimistic_ties(sim):
    ks = (1, 2, 3, 5)
    recall = recall_at_k(torch.tensor(sim), ks)
    transposed = [list(col) for col in zip(*sim, strict=True)]
    for k in ks:
        assert recall["i2t"][k] == pytest.approx(brute_force_recall(sim, k))
        assert recall["t2i"][k] == pytest.approx(brute_force_recall(transposed, k))
    row = ev.flat_recall(torch.tensor(sim), ks)  # the harness' columns are the same numbers
    assert row["I2T R@1"] == recall["i2t"][1] and row["T2I R@5"] == recall["t2i"][5]
    assert row[ev.R1] == pytest.approx((recall["i2t"][1] + recall["t2i"][1]) / 2)


def brute_force_multi_recall(sim: list[list[float]], correct: list[list[bool]], k: int) -> float:
    """% of rows with any correct item in the top k, ties sorted against the correct items."""
    hits = 0
    for row, ok in zip(sim, correct, strict=True):
        order = sorted(range(len(row)), key=lambda j: (-row[j], ok[j]))
        hits += any(ok[j] for j in order[:k])
    return 100.0 * hits / len(sim)


def test_repeated_captions_count_as_matches_and_recall_matches_brute_force():
    captions = ["a red star", "a blue star", "a red star", "a green ring", "a blue star", "a red star"]
    positives = same_caption_mask(captions)
    assert positives.tolist()[0] == [True, False, True, False, False, True]
    sim = torch.randint(0, 4, (6, 6), generator=torch.Generator().manual_seed(3)).float()
    recall = recall_at_k(sim, (1, 2, 3), positives)
    correct = positives.tolist()
    for k in (1, 2, 3):
        assert recall["i2t"][k] == pytest.approx(brute_force_multi_recall(sim.tolist(), correct, k))
        assert recall["t2i"][k] == pytest.approx(brute_force_multi_recall(sim.T.tolist(), correct, k))
    # An image retrieving another copy of its own caption is right; with distinct captions it would be wrong.
    copy_first = torch.eye(3)[[2, 1, 0]] + 0.5 * torch.eye(3)  # rows 0 and 2 rank the other's text first
    assert recall_at_k(copy_first, (1,), same_caption_mask(["x", "y", "x"]))["i2t"][1] == 100.0
    assert recall_at_k(copy_first, (1,))["i2t"][1] == pytest.approx(100 / 3)


def test_hand_made_matrix_by_hand():
    recall = recall_at_k(torch.tensor(HAND_MADE), (1, 2, 3, 4))["i2t"]
    assert recall == {1: 25.0, 2: 50.0, 3: 75.0, 4: 100.0}  # ranks 0, 3, 1, 2


# ------------------------------------------------------------------------------------------ small pieces


def _rows(z, o, **others):
    return {"zero_shot": {ev.R1: z}, "oracle": {ev.R1: o}} | {s: {ev.R1: v} for s, v in others.items()}


def test_headroom_skips_tasks_where_the_oracle_gains_too_little():
    per_task = {"a": _rows(10, 30, sglora=15), "b": _rows(20, 40, sglora=30), "flat": _rows(50, 50.5, sglora=10)}
    per_task_h, summary, skipped = ev.headroom(per_task, min_gain=1.0)
    assert skipped == ["flat"] and math.isnan(per_task_h["flat"]["sglora"])
    assert per_task_h["a"]["sglora"] == pytest.approx(25.0) and per_task_h["b"]["sglora"] == pytest.approx(50.0)
    assert summary["sglora"]["headroom"] == pytest.approx(37.5)  # mean over the two kept tasks
    # pooled over all three: (55/3 − 80/3) / (120.5/3 − 80/3)
    assert summary["sglora"]["headroom (pooled)"] == pytest.approx(100 * (55 - 80) / (120.5 - 80))
    assert summary["oracle"]["headroom"] == pytest.approx(100.0) and summary["zero_shot"]["headroom"] == 0.0


@pytest.mark.parametrize("n", [2, 3, 8, 13])
def test_shuffled_descriptions_never_route_a_task_with_its_own(n):
    for seed in range(5):
        p = ev.derangement(n, seed)
        assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))


def test_seed_zero_is_the_config_itself_and_other_seeds_move_split_experts_and_cvae():
    assert ev.seeded(TINY, 0) == TINY
    s = ev.seeded(TINY, 2)
    assert (s.dataset.split_seed, s.experts.seed, s.cvae.seed) == (2, 2, 2)
    paper = ev.PRESETS["paper-synthetic"].dataset
    assert (48 - paper.n_unseen, paper.n_unseen, paper.n_test_pairs) == (40, 8, 60)


def test_cross_dataset_mode_treats_every_task_of_dataset_b_as_unseen():
    from offline.config import DatasetConfig

    b = DatasetConfig(kind="synthetic", n_pairs=10, n_test_pairs=4, seed=7, n_unseen=3)
    split = ev.evaluation_split(None, b, seed=1)  # the library's context is not consulted in this mode
    assert len(split.unseen) == 48 and not split.seen
    assert all(len(split.test_pairs[t.name]) == 4 and len(t.pairs) == 6 for t in split.unseen)


def test_cli_takes_several_seeds_after_one_flag(monkeypatch, tmp_path):
    from offline.__main__ import cli

    seen = {}
    monkeypatch.setattr(ev, "run_evaluation", lambda config, out, seeds, eval_cfg, **kw: seen.update(
        config=config, seeds=seeds, eval_cfg=eval_cfg) or ev.Report(out, {}, "table"))
    result = CliRunner().invoke(cli, ["evaluate", "--tiny", "--seeds", "0", "1", "2", "--out", str(tmp_path),
                                      "--max-tasks", "3"])
    assert result.exit_code == 0, result.output
    assert seen["seeds"] == [0, 1, 2] and seen["config"] == TINY and seen["eval_cfg"].max_tasks == 3
    assert CliRunner().invoke(cli, ["evaluate", "--tiny", "--preset", "tiny"]).exit_code != 0


# ------------------------------------------------------------------------------------------ the tiny run

QUICK = ev.EvalConfig(cvae_samples=3, coverage_remove=(4,), k_grid=(1, 4), tau_grid=(0.05, 0.5))


@pytest.fixture(scope="module")
def report(tiny_build, tmp_path_factory):
    """One seed, every unseen task of the tiny store, lighter checks."""
    out = tmp_path_factory.mktemp("eval")
    return ev.run_evaluation(tiny_build.config, out, seeds=[0], eval_cfg=QUICK, store_dir=tiny_build.out,
                             progress=False, command="pytest")


def _table(markdown: str, title: str) -> tuple[list[str], dict[str, list[str]]]:
    """Header and rows (first cell -> other cells) of the markdown table under `## title`."""
    section = markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return cells[0], {row[0]: row[1:] for row in cells[2:]}


def test_report_table_has_a_row_per_strategy_and_recall_both_ways_and_headroom(report):
    header, rows = _table(report.markdown, "Recall by strategy")
    assert header == ["strategy", "I2T R@1", "I2T R@5", "I2T R@10", "T2I R@1", "T2I R@5", "T2I R@10", ev.R1,
                      "headroom", "headroom (pooled)", "seen LOTO mR@1", "seen LOTO headroom", "gated tasks",
                      "tasks below zero-shot"]
    assert list(rows) == list(ev.STRATEGY_ORDER) + list(ceiling.ROWS)
    assert all(len(cells) == len(header) - 1 for cells in rows.values())
    for name in ("report.md", "results.json", "recall.png", "split.json", "config.json", "seed0/build_config.json"):
        assert (report.out / name).stat().st_size > 0, name


def test_split_file_names_the_library_and_the_evaluated_tasks(report, tiny_build):
    split = json.loads((report.out / "split.json").read_text())["seed0"]
    assert split["seen"] == [t.name for t in tiny_build.split.seen]
    assert split["unseen"] == [t.name for t in tiny_build.split.unseen]
    assert not set(split["seen"]) & set(split["unseen"])
    assert set(split["held_out_pairs"].values()) == {TINY.dataset.n_test_pairs}


def _mean_r1(report):
    average = report.results["per_seed"][0]["average"]
    return {s: round(average[s][ev.R1], 2) for s in ev.STRATEGY_ORDER}


def test_oracle_beats_zero_shot_on_average_r1(report):
    r1 = _mean_r1(report)
    print("mean R@1 by strategy:", r1)
    assert r1["zero_shot"] < r1["oracle"], f"the oracle must beat zero-shot, or the setup shows nothing: {r1}"


@pytest.mark.parametrize("strategy", ["sglora", "default"])
def test_generated_adapters_beat_zero_shot_on_average_r1(report, strategy):
    r1 = _mean_r1(report)
    assert r1["zero_shot"] < r1[strategy], r1


def test_every_row_carries_its_seen_task_leave_one_task_out_figure(report, tiny_build):
    average = report.results["per_seed"][0]["average"]
    table = routing_record(json.loads((tiny_build.out / "manifest.json").read_text()))["validation"]["table"]
    for strategy in ("zero_shot", "topk_weighted", "delta_merge", "transfer_routed"):
        assert average[strategy]["seen LOTO mR@1"] == pytest.approx(table[strategy]["loto_mr1"])
    assert average["oracle"]["seen LOTO headroom"] == 100.0


def test_routing_ceilings_bound_what_one_expert_can_do(report):
    seed = report.results["per_seed"][0]
    average = seed["average"]
    hindsight, attribute = average[ceiling.HINDSIGHT], average[ceiling.ATTRIBUTES]
    # The hindsight expert is the best of every expert on the task's own held-out pairs (the attribute router's pick
    # among them), and on the seen tasks the best of every other expert's measured gain.
    assert hindsight[ev.R1] >= attribute[ev.R1] - 1.0
    assert hindsight["seen LOTO mR@1"] >= attribute["seen LOTO mR@1"]
    assert hindsight[ev.R1] > average["zero_shot"][ev.R1]
    assert all(ceiling.HINDSIGHT in rows for rows in seed["per_task"].values())
    assert f"template: {ceiling.HINDSIGHT} headroom (pooled)" in report.results["summary"]["headline"]
    assert "are ceilings, not strategies" in report.markdown


@pytest.mark.parametrize("strategy", ev.CHECKED)
def test_true_descriptions_beat_shuffled_ones(report, strategy):
    cells = report.results["per_seed"][0]["checks"]["semantic"][strategy]
    assert cells["true description"] > cells["shuffled description"], cells


def test_every_check_is_reported(report):
    checks = report.results["per_seed"][0]["checks"]
    assert set(checks) == {"semantic", "coverage", "spread", "sweep"}
    assert set(checks["coverage"]["transfer_routed"]) == {"full library", "top-4 removed"}
    assert set(checks["sweep"]) == {f"{s} K={k}" for s in ev.CHECKED for k in QUICK.k_grid}
    assert checks["spread"]["sglora"]["std over samples"] >= 0


def test_rows_for_how_people_write_are_reported(report):
    from offline.phrasing import HELD_OUT_DESCRIPTION_TEMPLATES, HELD_OUT_OUT_OF_DOMAIN

    seed = report.results["per_seed"][0]
    assert set(seed["wordings"]) == {"zero_shot", "topk_weighted", "delta_merge", "transfer_routed", "sglora_mean",
                                     "default"}
    assert set(seed["wordings_per_task"]) == set(seed["per_task"])
    assert 0 <= seed["wordings"]["default"]["gated %"] <= 100
    # zero-shot does not read the description: its wording row is its template row
    assert seed["wordings"]["zero_shot"][ev.R1] == pytest.approx(seed["average"]["zero_shot"][ev.R1])
    assert set(seed["out_of_domain"]) == set(HELD_OUT_OUT_OF_DOMAIN) | {"all"}
    every = seed["out_of_domain"]["all"]
    assert every["zero-shot mR@1"] == pytest.approx(seed["average"]["zero_shot"][ev.R1])
    assert 0 <= every["gate fired %"] <= 100
    headline = report.results["summary"]["headline"]
    assert {"template: default headroom (pooled)", "held-out wordings: default headroom (pooled)",
            "held-out wordings: gated %", "out-of-domain: gate fired %"} <= set(headline)
    assert len(HELD_OUT_DESCRIPTION_TEMPLATES) >= 5
    for title in ("Headline", "Held-out wordings", "Out-of-domain", "Each held-out out-of-domain description"):
        assert f"## {title}" in report.markdown
    described = seed["out_of_domain_descriptions"]
    assert len(described) == sum(len(texts) for texts in HELD_OUT_OUT_OF_DOMAIN.values())
    assert "a photo of a dog (other domain; unknown words: dog)" in described
    assert all(cells["gate fired %"] in (0.0, 100.0) and -1 <= cells["best cosine to a library description"] <= 1
               for cells in described.values())
    _, rows = _table(report.markdown, "Each held-out out-of-domain description: the gate, and how close the base "
                                      "reads it to the library (mean ± std over seeds)")
    gate, cosine = rows["a photo of a dog (other domain; unknown words: dog)"]
    assert gate in ("0.0 ± 0.0", "100.0 ± 0.0") and re.fullmatch(r"-?[01]\.\d{3} ± 0\.000", cosine), cosine


def test_results_say_what_they_came_from(report):
    provenance = report.results["provenance"]
    assert provenance["command"] == "pytest" and provenance["wall_s"] > 0 and provenance["torch_threads"] >= 1
    assert {"commit", "machine", "cpu_count", "tree_clean"} <= set(provenance)
    assert report.results["per_seed"][0]["wall_s"] > 0
