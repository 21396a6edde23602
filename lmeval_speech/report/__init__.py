"""Reports over lm-eval runs: ``report`` explains one run's modality gap (``report.py``, figures in
``plots.py``), reading the run through ``runs.py``, which also gives ``compare`` the settings that
must match between runs."""
