"""``easyref bench ...``: build a benchmark, score runs, report, and run a human preference study.

The generation half (``bench run``, ``bench scaling``) lives in
``easyref.bench.generation_commands`` and is added here when that module is present, so the two
halves can land in either order and ``easyref bench --help`` always lists what is installed.

Each sub-command sets ``handler``: a function of the parsed arguments returning the exit
status. Heavy libraries load inside the handlers, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from pathlib import Path

from easyref.cli_options import add_base_config, add_verbose


def _command(subparsers, name: str, handler, help: str, description: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=description)
    add_verbose(parser)
    parser.set_defaults(handler=handler)
    return parser


def add_commands(subparsers) -> None:
    """Add ``bench`` and its sub-commands to the ``easyref`` command's sub-parsers."""
    bench = subparsers.add_parser(
        "bench", help="MRBench: build the benchmark, generate, score, report, compare by eye",
        description="MRBench, the multi-reference benchmark of the EasyRef paper. Typical order: "
                    "build -> run -> score -> report (and compare -> winrate for a human study).")
    add_verbose(bench)
    commands = bench.add_subparsers(dest="bench_command", metavar="COMMAND", required=True)

    build = _command(
        commands, "build", cmd_build, help="write a manifest from a folder of image groups",
        description="Write a benchmark manifest (JSON lines) from FOLDER/<domain>/<group>/<images>. In each "
                    "group folder the LAST image by sorted file name is the target and the others are the "
                    "references; groups with fewer than 2 images are skipped (with a warning). The target's "
                    "caption is its entry in the group's captions.json ({\"file name\": \"caption\"}), else the "
                    "text of the group's caption.txt, else empty. Images are .png/.jpg/.jpeg/.webp/.bmp/.gif/"
                    ".tif files directly in the group folder (hidden files skipped). Ids are <domain>-<group>.")
    build.add_argument("folder", metavar="FOLDER", help="folder holding one sub-folder per domain")
    build.add_argument("--held-out-domains", nargs="+", default=[], metavar="DOMAIN",
                       help="domain folder names whose groups form the held-out (zero-shot) split; each must "
                            "exist in FOLDER (default: none, every group is held-in)")
    build.add_argument("--output", "-o", required=True, metavar="FILE",
                       help="manifest to write, e.g. mrbench.jsonl; paths inside its folder are stored relative")

    coco = _command(
        commands, "build-coco", cmd_build_coco, help="write a single-reference manifest from COCO captions",
        description="Write a manifest for the paper's single-reference protocol (Table 2): each COCO image is "
                    "its own reference and target, its first caption the prompt; split and domain are 'coco'.")
    coco.add_argument("captions", metavar="CAPTIONS_JSON", help="COCO captions file, e.g. captions_val2017.json")
    coco.add_argument("images", metavar="IMAGE_DIR", help="folder holding the COCO images named in CAPTIONS_JSON")
    coco.add_argument("--limit", type=int, metavar="N",
                      help="keep the first N captioned images by image id (default: all)")
    coco.add_argument("--output", "-o", required=True, metavar="FILE", help="manifest to write, e.g. coco.jsonl")

    score = _command(
        commands, "score", cmd_score, help="compute CLIP-I, CLIP-T and DINO-I for run folders",
        description="Score every finished image of each RUN folder: CLIP-I (generated vs target) and DINO-I "
                    "(generated vs target), cosine similarities, and CLIP-T (generated vs caption) as CLIPScore, "
                    "2.5 x max(cosine, 0), the paper's scale (the raw cosine is kept as clip_t_cosine). Writes "
                    "RUN/scores.csv and RUN/scores.json and prints a summary with 95% intervals.")
    score.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by 'easyref bench run'")
    score.add_argument("--clip", required=True, metavar="ID_OR_DIR",
                       help="CLIPModel folder or hub id, e.g. openai/clip-vit-large-patch14")
    score.add_argument("--dino", required=True, metavar="ID_OR_DIR",
                       help="Dinov2Model folder or hub id, e.g. facebook/dinov2-base")
    score.add_argument("--batch-size", type=int, default=16, metavar="N",
                       help="images embedded at once; lower it if the GPU runs out of memory (default: 16)")
    score.add_argument("--device", default="auto", metavar="NAME",
                       help="auto (CUDA if present, then Apple MPS, else CPU), cpu, cuda, cuda:1, mps; float16 "
                            "on a GPU, float32 on CPU (default: auto)")

    report = _command(
        commands, "report", cmd_report, help="write report.md with tables, paired comparisons and plots",
        description="Write OUTPUT/report.md (measured scores laid out like paper Table 3 with 95% intervals, "
                    "per-domain scores, the paper's published numbers for reference, paired comparisons of "
                    "every two runs) and OUTPUT/metrics.png and OUTPUT/group_size.png. Needs scored runs "
                    "('easyref bench score') and matplotlib (pip install 'easyref[bench]').")
    report.add_argument("runs", nargs="+", metavar="RUN", help="scored run folders, one table row each")
    report.add_argument("--output", "-o", required=True, metavar="DIR", help="folder to write (created if needed)")

    compare = _command(
        commands, "compare", cmd_compare, help="write an A/B web page for a human preference study",
        description="Write OUTPUT/compare.html (and OUTPUT/images/), a page that opens from disk with no server. "
                    "For each group both runs finished it shows the references and the two runs' first images "
                    "in a seeded random left/right order, and asks which looks better and which is more "
                    "consistent with the references. Raters press 'Download results' and send back the JSON "
                    "file; 'easyref bench winrate' pools those files.")
    compare.add_argument("run_a", metavar="RUN_A", help="first run folder (called A in the results)")
    compare.add_argument("run_b", metavar="RUN_B", help="second run folder (called B in the results)")
    compare.add_argument("--output", "-o", required=True, metavar="DIR", help="folder to write (created if needed)")
    compare.add_argument("--seed", type=int, default=0, metavar="N",
                         help="seed of the left/right order; give raters pages with different seeds to "
                              "balance position bias (default: 0)")

    winrate = _command(
        commands, "winrate", cmd_winrate, help="pool raters' result files into win rates",
        description="Print, per question, each run's win rate and the tie rate over all answers (the three add "
                    "up to 100%) with 95% Wilson score intervals. All files must compare the same two runs.")
    winrate.add_argument("files", nargs="+", metavar="FILE", help="JSON files saved by the compare page")

    ipa = _command(
        commands, "train-ip-adapter", cmd_train_ip_adapter, help="train the IP-Adapter baseline for a base model",
        description="Train an IP-Adapter (diffusers' own, with a CLIP image encoder) for BASE on the image-caption "
                    "pairs of a release-format data file (records whose image_file is [target], e.g. ShapesWorld's "
                    "train/stage1.json), the way IP-Adapter was trained: the image is its own reference, text / "
                    "image / both dropped 5% each, only the projection and to_k_ip / to_v_ip learn. Writes "
                    "OUTPUT/ip-adapter/ (ip-adapter_sdxl.safetensors + image_encoder/), which 'bench run --method "
                    "ip-adapter --ip-adapter OUTPUT/ip-adapter' loads; rerunning resumes from OUTPUT/work/.")
    ipa.add_argument("--base", required=True, metavar="DIR_ID_OR_FILE",
                     help="the SDXL base model (a diffusers folder, a hub id or a single-file .safetensors)")
    add_base_config(ipa)
    ipa.add_argument("--image-encoder", required=True, metavar="DIR_OR_ID",
                     help="CLIP image encoder (a CLIPVisionModelWithProjection or CLIPModel folder)")
    ipa.add_argument("--data", required=True, metavar="FILE.json", help="training records (the pairs are used)")
    ipa.add_argument("--image-root", metavar="DIR", help="folder the records' paths are relative to "
                                                          "(default: the data file's folder)")
    ipa.add_argument("--output", required=True, metavar="DIR", help="run folder")
    ipa.add_argument("--max-steps", type=int, default=2000, metavar="N", help="optimizer steps (default: 2000)")
    ipa.add_argument("--batch-size", type=int, default=8, metavar="N", help="(default: 8)")
    ipa.add_argument("--learning-rate", type=float, default=1e-4, metavar="LR", help="(default: 1e-4)")
    ipa.add_argument("--resolution", type=int, default=1024, metavar="PX", help="square training size (default: 1024)")
    ipa.add_argument("--seed", type=int, default=0, metavar="N", help="(default: 0)")
    ipa.add_argument("--no-progress", action="store_true", help="no progress bar")

    if importlib.util.find_spec("easyref.bench.generation_commands") is not None:
        from easyref.bench.generation_commands import add_run_commands

        add_run_commands(commands)


# -- handlers -----------------------------------------------------------------------------------

def _print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def cmd_train_ip_adapter(args: argparse.Namespace) -> int:
    from easyref.bench.ip_adapter_training import IPAdapterTraining, train_ip_adapter

    settings = IPAdapterTraining(steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                                 resolution=args.resolution, seed=args.seed)
    folder = train_ip_adapter(args.base, args.image_encoder, args.data, args.output, settings,
                              image_root=args.image_root, progress=not args.no_progress, base_config=args.base_config)
    print(f"wrote {folder}; benchmark it with: easyref bench run --method ip-adapter --ip-adapter {folder} ...")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from easyref.bench.manifest import build_manifest, load_manifest

    output = build_manifest(args.folder, args.output, args.held_out_domains)
    groups = load_manifest(output)
    held_out = sum(group.split == "held-out" for group in groups)
    print(f"wrote {output}: {len(groups)} groups ({len(groups) - held_out} held-in, {held_out} held-out)")
    return 0


def cmd_build_coco(args: argparse.Namespace) -> int:
    from easyref.bench.manifest import load_coco, write_manifest

    groups = load_coco(args.captions, args.images, args.limit)
    print(f"wrote {write_manifest(groups, args.output)}: {len(groups)} single-reference groups")
    return 0


def _interval(row: dict, metric: str) -> str:
    return f"{row[metric]:.3f} [{row[f'{metric}_low']:.3f}, {row[f'{metric}_high']:.3f}]"


def cmd_score(args: argparse.Namespace) -> int:
    from easyref.bench.metrics import METRIC_LABELS, METRICS, score_runs, summarize

    for path in score_runs(args.runs, args.clip, args.dino, args.batch_size, args.device):
        print(f"wrote {path}")
        _print_table(["split", "domain", "groups", *(METRIC_LABELS[m] for m in METRICS)],
                     [[row["split"], row["domain"], row["groups"], *(_interval(row, m) for m in METRICS)]
                      for row in summarize(path)])
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from easyref.bench.report import write_report

    print(f"wrote {write_report(args.runs, args.output)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from easyref.bench.human import write_compare_page

    page = write_compare_page(args.run_a, args.run_b, args.output, seed=args.seed)
    print(f"wrote {page}: open it in a browser (send raters the whole {Path(args.output)} folder), then pool the "
          f"downloaded files with: easyref bench winrate FILE [FILE ...]")
    return 0


def cmd_winrate(args: argparse.Namespace) -> int:
    from easyref.bench.human import TIE, win_rates

    rates = win_rates(args.files)
    outcomes = [*rates["runs"], TIE]
    rows = [[question, result["answers"],
             *(f"{o['rate']:.0%} [{o['low']:.0%}, {o['high']:.0%}]" for o in map(result["outcomes"].get, outcomes))]
            for question, result in rates["questions"].items()]
    print(f"{rates['files']} file(s); win rate over all answers, ties separate, 95% Wilson intervals")
    _print_table(["question", "answers", *outcomes], rows)
    return 0
