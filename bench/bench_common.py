"""What the throughput benchmarks share: the machine's core count and their first command-line options.

A sibling module: `python bench/<script>.py` puts bench/ on the import path.
"""

from __future__ import annotations

import argparse

from pipeline.machine import usable_cores

CORES = usable_cores()


def input_parser(doc: str | None, images: int) -> argparse.ArgumentParser:
    """A parser (description `doc`) with --config, --prepared and --images (how many images, default `images`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--prepared", default="data/demo/prepared")
    parser.add_argument("--images", type=int, default=images)
    return parser
