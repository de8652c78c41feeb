"""The CPU demo: the embedded SmolLM2 source (embedded), the demo data and target (data), the
pipeline (pipeline, `python -m composer_sheared.demo`), its report and plots (report, plots).

Nothing is imported here, so `composer_sheared.demo.embedded` stays light for the recipe.
"""
