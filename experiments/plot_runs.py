"""Learning curves of several runs in one PNG.

    python experiments/plot_runs.py runs/a runs/b runs/c --out=runs/curves.png

draws test accuracy and test loss against epoch and against training time, one
line per run, each labelled by the settings in which the runs differ (e.g.
``lr=0.1`` / ``lr=0.3``). Takes about 2 seconds. The same figure in a notebook:
``bpjax.runs_figure(["runs/a", "runs/b"])``.
"""

from __future__ import annotations

import dataclasses

from bpjax import cli
from bpjax.bench.report import save_png
from bpjax.config import setting
from bpjax.errors import ConfigError
from bpjax.outputs import check_out_file, writing
from bpjax.runs import runs_figure


@dataclasses.dataclass(frozen=True)
class PlotSettings:
    out: str = setting("runs_curves.png", "Where the PNG goes.")


cli.define_flags(PlotSettings)


def main(argv: list[str]) -> None:
    workdirs = argv[1:]
    if not workdirs:
        raise ConfigError("name at least one run directory: plot_runs.py RUN [RUN ...]")
    settings = cli.from_flags(PlotSettings)
    check_out_file("out", settings.out)  # before reading the runs: a bad path costs nothing
    figure = runs_figure(workdirs)
    with writing("out", settings.out):
        save_png(figure, settings.out, bbox_inches=None)  # the figure's own size
    print(f"wrote {settings.out} ({len(workdirs)} runs)")


if __name__ == "__main__":
    cli.run(main, positional=True)
