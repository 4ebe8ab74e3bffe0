"""What a run leaves: cost, history, the step summary, test results, the serving benchmark, gates and comparisons."""
