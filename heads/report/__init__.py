"""Reports: what finished run directories say, as tables, figures and one page. Reads run directories only
(metrics.json, config.json, history.json, val_predictions.csv through heads.rundir's readers), never the
training code, so any run written by any version can be reported.

    runs.py     find and load runs, label configurations, mean ± std per configuration (the bottom layer)
    plan.py     an ablation's grid plan (ablate.json, written by every `heads ablate` slice): which runs are missing
    tables.py   CSV / Markdown / LaTeX: summary.csv/md, top<K>.md/.tex
    figures.py  every PNG: a run's curves / confusion / gate, comparison.png, the page's figures
    compare.py  paired comparison against a baseline, modality analysis (val_predictions.csv)
    groupby.py  --group-by tables, correlation of numeric hyperparameters with the metric
    page.py     summary.html / summary.png
    console.py  the rich metrics table of one run (heads train / finetune / show)
    build.py    write_reports: `heads report` and the end of `heads ablate`; the only module importing the rest

This file imports nothing, so that training's `from heads.report.figures import ...` stays light.
"""
