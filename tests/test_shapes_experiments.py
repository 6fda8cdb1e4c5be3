"""ShapesWorld part 2's orchestration: which commands run, what is skipped or resumed, and how results read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from easyref.shapes import experiments, results
from easyref.shapes.schedule import Step, run_steps


@pytest.fixture()
def commands(monkeypatch):
    """Record the easyref commands instead of running them; a training command leaves a finished model, a
    benchmark run its folder."""
    calls = []

    def fake(args):
        args = [str(a) for a in args]
        calls.append(args)
        if args[0] == "train":
            adapter = Path(args[args.index("--output") + 1]) / "adapter"
            adapter.mkdir(parents=True)
            (adapter / "config.json").write_text("{}")
        elif args[:2] == ["bench", "train-ip-adapter"]:
            (Path(args[args.index("--output") + 1]) / "ip-adapter").mkdir(parents=True)
        elif args[:2] in (["bench", "run"], ["bench", "scaling"]):
            Path(args[args.index("--output") + 1]).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(experiments, "command", fake)
    return calls


def _option(args, name):
    return args[args.index(name) + 1]


def _run(tmp_path, methods, recipe, **options):
    steps, runs = experiments.experiment_steps(tmp_path / "out", tmp_path / "world", tmp_path / "pre", recipe,
                                               methods=methods, scaling=False, lora=False, **options)
    pretraining = [Step(name, lambda: None) for name in options.get("made_by", {}).values()]
    run_steps(pretraining + steps, jobs=1, progress=False)
    return steps, runs


def test_variants_share_the_stages_before_their_own(commands, tmp_path):
    recipe = experiments.Recipe()
    runs = tmp_path / "out" / "runs"
    _, folders = _run(tmp_path, ("easyref", "easyref-average"), recipe)
    trains = [c for c in commands if c[0] == "train"]
    # align, single and multi for EasyRef; only its own multi stage for the variant
    assert [_option(c, "--stage") for c in trains] == ["align", "single", "multi", "multi"]
    align, single, multi, variant = trains
    assert "--init" not in align and _option(align, "--num-reference-tokens") == str(recipe.reference_tokens)
    assert _option(single, "--init") == str(runs / "align" / "adapter")
    assert _option(multi, "--init") == _option(variant, "--init") == str(runs / "single" / "adapter")
    assert _option(variant, "--aggregation") == "average" and _option(multi, "--aggregation") == "tokens"
    assert _option(multi, "--max-steps") == str(recipe.multi.steps)
    assert _option(multi, "--data").endswith("stage3.json") and _option(single, "--data").endswith("stage2.json")
    assert "--lora-rank" not in align and _option(multi, "--lora-rank") == str(recipe.lora_rank)
    benches = {_option(c, "--output"): _option(c, "--adapter") for c in commands if c[:2] == ["bench", "run"]}
    assert benches == {str(folders["easyref"]): str(runs / "multi" / "adapter"),
                       str(folders["easyref-average"]): str(runs / "multi-average" / "adapter")}


def test_multi_only_starts_stage_multi_from_a_new_adapter(commands, tmp_path):
    """The progressive-training ablation: stage multi alone, from a new adapter, with EasyRef's shape."""
    recipe = experiments.Recipe()
    _run(tmp_path, ("easyref-multi-only",), recipe)
    (only,) = [c for c in commands if c[0] == "train"]
    assert _option(only, "--output") == str(tmp_path / "out" / "runs" / "multi-only")
    assert _option(only, "--stage") == "multi" and "--init" not in only and "--skip-earlier-stages" in only
    assert _option(only, "--num-reference-tokens") == str(recipe.reference_tokens)


def test_every_step_waits_for_the_models_it_uses_and_no_more(commands, tmp_path):
    made_by = {model: f"make {model}" for model in ("judge", "clip", "dino", "base", "mllm")}
    steps, _ = _run(tmp_path, experiments.BENCH_METHODS, experiments.Recipe(), made_by=made_by)
    after = {step.name: set(step.after) for step in steps}
    scoring = {"make judge", "make clip", "make dino"}
    assert after["train align"] == after["train multi-only"] == {"make base", "make mllm"}
    assert after["train ip-adapter"] == {"make base", "make clip"}
    assert after["train single"] == {"train align"} and after["train multi-no-single"] == {"train align"}
    for variant in ("multi", "multi-average", "multi-concat"):
        assert after[f"train {variant}"] == {"train single"}
    assert after["bench text-only"] == {"make base"} | scoring
    assert after["bench easyref"] == {"train multi"} | scoring
    assert after["bench ip-adapter"] == {"train ip-adapter"} | scoring
    assert after["bench easyref-no-single"] == {"train multi-no-single"} | scoring
    # each shared stage is trained once, and every benchmark run is scored with the judge and the encoders
    stages = [_option(c, "--output") for c in commands if c[0] == "train"]
    assert len(stages) == len(set(stages)) == 7
    scored = [c[-1] for c in commands if c[:2] == ["shapes", "score"]]
    assert sorted(scored) == sorted(c[-1] for c in commands if c[:2] == ["bench", "score"])
    assert len(scored) == len(experiments.BENCH_METHODS)


def test_the_scaling_curves_and_per_group_lora_wait_for_what_they_use(commands, tmp_path):
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "world.json").write_text(json.dumps({"settings": {"test_references": 8}}))
    made_by = {"base": "pretrain base", "judge": "pretrain judge"}
    steps, runs = experiments.experiment_steps(tmp_path / "out", tmp_path / "world", tmp_path / "pre",
                                               experiments.Recipe(), made_by=made_by)
    after = {step.name: set(step.after) for step in steps}
    assert after["scaling easyref"] == {"train multi", "pretrain judge"}
    assert after["scaling ip-adapter"] == {"train ip-adapter", "pretrain judge"}
    assert after["bench lora"] == {"pretrain base", "pretrain judge"}
    run_steps([Step(name, lambda: None) for name in made_by.values()] + steps, jobs=1, progress=False)
    (scaling,) = [c for c in commands if c[:2] == ["bench", "scaling"] and "easyref" in c[c.index("--method") + 1]]
    assert scaling[scaling.index("--sizes") + 1:] == ["1", "2", "4", "8"]  # up to the references rendered
    assert _option(scaling, "--adapter") == str(tmp_path / "out" / "runs" / "multi" / "adapter")
    judged = [c for c in commands if c[:2] == ["shapes", "score"] and str(tmp_path / "out" / "scaling") in c[-1]]
    assert {c[-1] for c in judged} == {str(runs[f"scaling/{m}/8"]) for m in experiments.SCALING_METHODS}
    (lora,) = [c for c in commands if c[:2] == ["bench", "run"] and _option(c, "--method") == "lora"]
    assert _option(lora, "--bench").endswith("manifest-lora.jsonl")


def test_a_finished_stage_is_not_trained_again(commands, tmp_path):
    finished = tmp_path / "out" / "runs" / "align" / "adapter"
    finished.mkdir(parents=True)
    (finished / "config.json").write_text("{}")
    _run(tmp_path, ("easyref",), experiments.Recipe())
    assert [_option(c, "--stage") for c in commands if c[0] == "train"] == ["single", "multi"]


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


def test_the_cost_adds_up_every_invocation_and_each_steps_parts_failed_ones_included():
    timings = {"wall_seconds": 5400.0, "runs": [
        {"jobs": 2, "threads": 1, "wall_seconds": 3600.0, "steps": {"pretrain clip": 600.0},
         "unfinished": {"pretrain base": 2900.0}, "failed": {"train align": 30.0}},
        {"jobs": 2, "threads": 1, "wall_seconds": 1800.0, "steps": {"pretrain base": 1600.0, "train align": 90.0}}]}
    lines = results.cost_lines(timings)
    assert lines[0].startswith("1.50 h of wall time (90 min) over 2 invocation(s)")
    assert "2 step(s) at once, 1 torch thread(s) each." in lines[0]
    assert [line for line in lines if line.startswith("| ") and "minutes" not in line] == [
        "| pretrain clip | 10.0 | 1 |", "| pretrain base | 75.0 | 2 |", "| train align | 2.0 | 2 |"]


def test_a_second_run_after_a_whole_one_runs_no_command(commands, tmp_path):
    _run(tmp_path, ("easyref", "text-only", "ip-adapter"), experiments.Recipe())
    assert {tuple(c[:2]) for c in commands} >= {("bench", "run"), ("shapes", "score"), ("bench", "score")}
    commands.clear()
    _run(tmp_path, ("easyref", "text-only", "ip-adapter"), experiments.Recipe())
    assert commands == []
