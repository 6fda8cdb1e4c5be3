"""ShapesWorld part 2's orchestration: which commands run, what is skipped or resumed, and how results read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from easyref.shapes import experiments, results


@pytest.fixture()
def commands(monkeypatch):
    """Record the easyref commands instead of running them; a 'train' call leaves a finished adapter."""
    calls = []

    def fake(args):
        args = [str(a) for a in args]
        calls.append(args)
        if args[0] == "train":
            adapter = Path(args[args.index("--output") + 1]) / "adapter"
            adapter.mkdir(parents=True)
            (adapter / "config.json").write_text("{}")

    monkeypatch.setattr(experiments, "easyref_command", fake)
    return calls


def _option(args, name):
    return args[args.index(name) + 1]


def test_variants_share_the_stages_before_their_own(commands, tmp_path):
    recipe = experiments.Recipe()
    runs = tmp_path / "runs"
    main = experiments.train_model("easyref", tmp_path / "world", tmp_path / "pre", runs, recipe)
    average = experiments.train_model("easyref-average", tmp_path / "world", tmp_path / "pre", runs, recipe)
    assert main == runs / "multi" / "adapter" and average == runs / "multi-average" / "adapter"
    # align, single and multi for EasyRef; only its own multi stage for the variant
    assert [_option(c, "--stage") for c in commands] == ["align", "single", "multi", "multi"]
    align, single, multi, variant = commands
    assert "--init" not in align and _option(align, "--num-reference-tokens") == str(recipe.reference_tokens)
    assert _option(single, "--init") == str(runs / "align" / "adapter")
    assert _option(multi, "--init") == _option(variant, "--init") == str(runs / "single" / "adapter")
    assert _option(variant, "--aggregation") == "average" and _option(multi, "--aggregation") == "tokens"
    assert _option(multi, "--max-steps") == str(recipe.multi.steps)
    assert _option(multi, "--data").endswith("stage3.json") and _option(single, "--data").endswith("stage2.json")
    assert "--lora-rank" not in align and _option(multi, "--lora-rank") == str(recipe.lora_rank)


def test_multi_only_starts_stage_multi_from_a_new_adapter(commands, tmp_path):
    """The progressive-training ablation: stage multi alone, from a new adapter, with EasyRef's shape."""
    recipe = experiments.Recipe()
    adapter = experiments.train_model("easyref-multi-only", tmp_path / "world", tmp_path / "pre", tmp_path / "r",
                                      recipe)
    assert adapter == tmp_path / "r" / "multi-only" / "adapter"
    (only,) = commands
    assert _option(only, "--stage") == "multi" and "--init" not in only and "--skip-earlier-stages" in only
    assert _option(only, "--num-reference-tokens") == str(recipe.reference_tokens)


def test_a_run_with_a_checkpoint_resumes_and_one_without_starts_over(commands, tmp_path):
    recipe = experiments.Recipe()
    resumed, restarted = tmp_path / "resumed", tmp_path / "restarted"
    (resumed / "checkpoint-100").mkdir(parents=True)
    restarted.mkdir()
    (restarted / "log.jsonl").write_text("")
    experiments.train_stage("align", resumed, tmp_path / "d.json", tmp_path, recipe.align, recipe)
    experiments.train_stage("align", restarted, tmp_path / "d.json", tmp_path, recipe.align, recipe)
    assert commands[0][-2:] == ["--resume", "latest"]
    assert "--resume" not in commands[1]
    assert not (restarted / "log.jsonl").exists()


def test_subset_manifest_keeps_the_first_groups_of_every_split_and_kind(tmp_path):
    lines = [{"id": f"{split}-{kind}-{i}", "shapes": {"split": split, "kind": kind}}
             for split, kinds in (("held-in", ("identity", "style")), ("held-out", ("identity", "scene")))
             for kind in kinds for i in range(5)]
    source = tmp_path / "manifest.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    subset = experiments.subset_manifest(source, tmp_path / "subset.jsonl", 2)
    kept = [json.loads(line)["id"] for line in subset.read_text().splitlines()]
    assert kept == [line["id"] for line in lines if int(line["id"].rsplit("-", 1)[1]) < 2]
    with pytest.raises(ValueError, match="beside"):
        experiments.subset_manifest(source, tmp_path / "elsewhere" / "subset.jsonl", 2)


def _entry(mean, low, high):
    return {"mean": mean, "low": low, "high": high, "groups": 100}


def test_targets_report_met_and_missed_from_the_numbers():
    summaries = {
        "easyref": {"held-out": {"concept_ok": _entry(0.9, 0.86, 0.94), "prompt_ok": _entry(0.8, 0.75, 0.85)},
                    "held-in": {"concept_ok": _entry(0.95, 0.9, 0.97), "prompt_ok": _entry(0.9, 0.85, 0.93)}},
        "ip-adapter": {"held-out": {"concept_ok": _entry(0.8, 0.74, 0.87)}},
        "easyref-average": {"held-out": {"concept_ok": _entry(0.7, 0.6, 0.8)}},
        "easyref-concat": {"held-out": {"concept_ok": _entry(0.92, 0.9, 0.95)}},
    }
    curves = {"easyref": {"held-in": [{"size": 1, "concept": _entry(0.5, 0.4, 0.6)},
                                      {"size": 8, "concept": _entry(0.9, 0.8, 0.95)}]}}
    lines = results.targets(summaries, curves)
    verdicts = [line.rsplit(" ", 1)[1] for line in lines]
    # 0.9 >= 0.85 met; gap 0.1 < 0.15 and intervals overlap: missed; 0.5 -> 0.9: met;
    # prompt 0.8 held-out: missed; concat beats tokens: missed
    assert verdicts == ["**met**", "**missed**", "**met**", "**missed**", "**missed**"]
    assert "+0.100" in lines[1] and "overlap" in lines[1]


def test_concept_share_gives_partial_credit_per_group(tmp_path):
    from easyref.shapes.scoring import COLUMNS

    rows = [  # identity: shape, colour, pattern; style: background, texture, pattern
        ("g1", "held-in", "identity", {"shape_ok": True, "colour_ok": True, "pattern_ok": False}),
        ("g1", "held-in", "identity", {"shape_ok": False, "colour_ok": False, "pattern_ok": False}),
        ("g2", "held-in", "style", {"background_ok": True, "texture_ok": True, "pattern_ok": True}),
        ("g3", "held-out", "style", {"background_ok": False, "texture_ok": True, "pattern_ok": False}),
    ]
    lines = [",".join(COLUMNS)]
    for index, (group, split, kind, oks) in enumerate(rows):
        values = {"group_id": group, "split": split, "kind": kind, "hard": "", "references": "4", "index": str(index),
                  "concept_ok": "False", "prompt_ok": "False", "both": "False",
                  **{key: str(value) for key, value in oks.items()}}
        lines.append(",".join(values.get(column, "") for column in COLUMNS))
    (tmp_path / "judge.csv").write_text("\n".join(lines) + "\n")
    shares = results.concept_share(tmp_path)
    # g1: images 2/3 and 0/3 -> 1/3; g2: 1; held-in mean over groups (1/3 + 1) / 2
    assert shares["held-in"]["mean"] == pytest.approx((1 / 3 + 1) / 2)
    assert shares["held-in"]["groups"] == 2
    assert shares["held-out"]["mean"] == pytest.approx(1 / 3)
