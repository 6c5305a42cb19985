"""The benchmark: data sets with ground truth, models, the runner, leaderboards, plots, report, CLI."""
